// Sets `cfg(twill_lab)` when the tests that need root (network namespaces, VXLAN, veth)
// can run: as root, or in CI (`CI` set), where a missing privilege must fail them
// rather than hide them. Those tests carry
// `#[cfg_attr(not(twill_lab), ignore = ...)]`, so a run without root reports them as
// ignored (not run), never as passed. The build scripts of the tests crate and of the
// agent (whose kernel tests need root too) include this file.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(twill_lab)");
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        )
    });
    // /proc/self/status: "Uid:\t<real>\t<effective>\t<saved>\t<fs>".
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    });
    if ci || root {
        println!("cargo::rustc-cfg=twill_lab");
    }
}
