//! Compiles proto/twill/v1/*.proto, and the subset of etcd's API the controller's etcd
//! store uses (proto/etcd, client stubs only), with protox (pure Rust), so no system
//! protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "twill/v1/lease.proto",
        "twill/v1/agent.proto",
        "twill/v1/admin.proto",
        "twill/v1/identity.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;

    let etcd = ["etcd/mvcc.proto", "etcd/rpc.proto", "etcd/election.proto"];
    for f in &etcd {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(etcd, ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
