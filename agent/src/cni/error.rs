//! The CNI error type: a well-known or plugin-specific code, a message and details,
//! printed as the spec's error JSON (`{"cniVersion", "code", "msg", "details"}`).

use serde_json::{json, Value};
use thiserror::Error;

/// Well-known error codes of the CNI specification, and Twill's own (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables, like `CNI_COMMAND` or `CNI_CONTAINERID`.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (here: the data directory holding saved delegate configs).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (bad JSON).
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later: a transient condition (the agent has not written subnet.env yet).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (no subnet.env yet, or the agent is not
    /// healthy); the runtime must not create pods on this network yet.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Twill: subnet.env exists but is malformed or incomplete.
    pub const BAD_SUBNET_ENV: u32 = 100;
    /// Twill: the delegate plugin could not be found, run, or returned garbage.
    pub const DELEGATE_FAILED: u32 = 101;
    /// Internal error (what libcni's skel uses for errors without a code).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: what the plugin prints on stdout before exiting non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{msg} (CNI error code {code})")]
pub struct CniError {
    /// The error code (see [`code`]).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Longer details; empty when there are none.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg` and no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error object for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_spec_error_object() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "not yet").with_details("later");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "not yet", "details": "later"})
        );
        let e = CniError::new(code::INCOMPATIBLE_VERSION, "old");
        assert!(e.to_json("0.3.1").get("details").is_none());
    }
}
