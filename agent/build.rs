//! Sets `cfg(twill_lab)` where the kernel tests can run (see tests/lab_cfg.rs).
include!("../tests/lab_cfg.rs");
