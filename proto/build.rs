//! Compiles proto/twill/v1/*.proto, and the subset of etcd's API the controller's etcd
//! store uses (proto/etcd, client stubs only), with protox (pure Rust), so no system
//! protoc is needed. It also writes the list of every Twill RPC (`methods.rs`), taken
//! from the same descriptors: the controller's authorization table is tested against
//! it, so an RPC added to a .proto without a policy fails the tests.

use std::fmt::Write as _;

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
    write_methods(&fds)?;
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

/// Writes `METHODS`: each RPC's path, and the number of its request's `node_name`
/// field (0 when it has none).
fn write_methods(
    fds: &tonic_prost_build::FileDescriptorSet,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = String::from("&[\n");
    for file in &fds.file {
        let package = file.package();
        for service in &file.service {
            for m in &service.method {
                let input = m.input_type().trim_start_matches('.');
                let node_name_field = fds
                    .file
                    .iter()
                    .flat_map(|f| {
                        f.message_type
                            .iter()
                            .map(move |msg| (format!("{}.{}", f.package(), msg.name()), msg))
                    })
                    .find(|(name, _)| name == input)
                    .and_then(|(_, msg)| msg.field.iter().find(|f| f.name() == "node_name"))
                    .map_or(0, |f| f.number());
                writeln!(
                    out,
                    "    Method {{ path: \"/{package}.{}/{}\", node_name_field: {node_name_field}, server_streaming: {} }},",
                    service.name(),
                    m.name(),
                    m.server_streaming()
                )?;
            }
        }
    }
    out.push_str("]\n");
    let dir = std::env::var("OUT_DIR")?;
    std::fs::write(std::path::Path::new(&dir).join("methods.rs"), out)?;
    Ok(())
}
