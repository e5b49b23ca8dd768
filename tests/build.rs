//! Sets `cfg(twill_lab)` where the tests that need root can run (see lab_cfg.rs).
include!("lab_cfg.rs");
