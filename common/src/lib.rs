//! Shared model of Twill: flannel's file formats (`net-conf.json`, `subnet.env`),
//! the lease model both sides carry (parsed at the wire edge), and certificate roles.
//! No I/O here beyond the files this crate owns (subnet.env, PEM files) and the
//! atomic replacement every binary uses for the files it writes ([`fs`]).

/// What a checked name (`struct Name(String)` whose `Name::new` checks it) shares with
/// `str`: `as_str`, `Deref` and `Borrow` to it, `Display` as the text, and `FromStr`
/// through the check.
macro_rules! checked_name {
    ($name:ident, $error:ty) => {
        impl $name {
            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = $error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::new(s)
            }
        }
    };
}

pub mod fs;
pub mod model;
pub mod netconf;
pub mod networks;
pub mod pods;
pub mod subnet_env;
pub mod tls;

pub use netconf::NetConf;
pub use subnet_env::SubnetEnv;

/// The trailer a controller replica ends an agent's watch with to have it resume on
/// another replica (it serves more than its share of the agents).
pub const MOVE_TRAILER: &str = "x-twill-move";

/// Parses a `humantime` duration such as `30s` or `24h`; used by every binary's flags.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 30s, 10m, 24h)"))
}

/// `t` in Unix seconds (0 before 1970, which no clock here reports).
pub fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The current Unix time in seconds.
pub fn now_unix() -> i64 {
    unix_secs(std::time::SystemTime::now())
}

/// Parses a duration that must not be zero (an interval or a period: zero would make
/// a loop spin or a timer panic).
pub fn parse_nonzero_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "{s:?} is zero: give a positive duration such as 10s"
        ));
    }
    Ok(d)
}

/// Logs to stderr for the daemons: level from `RUST_LOG` (default `info`), colours only
/// on a terminal so that journald and log files get plain text.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Lower-case hex of `bytes` (certificate serials, key hashes, DER in headers).
pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Decodes hex of either case; `None` when it is not an even number of hex digits.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(s.as_bytes()).ok()
}

#[cfg(test)]
mod hex_tests {
    #[test]
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let b = [0u8, 1, 0x7f, 0x80, 0xff];
        assert_eq!(super::hex(&b), "00017f80ff");
        assert_eq!(super::unhex(&super::hex(&b)).as_deref(), Some(&b[..]));
        assert_eq!(super::unhex("abc"), None);
        assert_eq!(super::unhex("zz"), None);
        assert_eq!(super::unhex("+f"), None, "no sign");
    }
}
