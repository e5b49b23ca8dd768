//! `twill-cni`: the flannel-compatible CNI plugin (see `twill_agent::cni`).

fn main() {
    std::process::exit(twill_agent::cni::main());
}
