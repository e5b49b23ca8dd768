//! twillctl's connection settings: flags, `TWILL_*` environment variables and a small
//! TOML file, `~/.config/twill/config.toml` (or `$XDG_CONFIG_HOME/twill/config.toml`),
//! in that order of precedence.
//!
//! ```toml
//! controller = "https://10.0.0.1:8474"
//! tls_cert = "admin-alice.crt"   # relative paths are relative to this file
//! tls_key = "admin-alice.key"
//! tls_ca = "ca.crt"
//! # tls_server_name = "twill.example.com"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// The keys a config file may hold (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The controller's URL, `https://HOST:PORT`.
    pub controller: Option<String>,
    /// Client certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) the controller's certificate must chain to.
    pub tls_ca: Option<PathBuf>,
    /// Name to verify the controller's certificate against.
    pub tls_server_name: Option<String>,
}

impl Settings {
    /// Fills every setting missing in `self` (flags and environment) from `file`.
    pub fn or(self, file: Settings) -> Settings {
        Settings {
            controller: self.controller.or(file.controller),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_server_name: self.tls_server_name.or(file.tls_server_name),
        }
    }
}

/// A config file that could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file named by `--config` / `TWILL_CONFIG` does not exist.
    #[error("config file {} does not exist (named by --config or TWILL_CONFIG)", .0.display())]
    Missing(PathBuf),
    /// The file exists but cannot be read.
    #[error("cannot read config file {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is not valid TOML, or holds an unknown key or a value of the wrong type.
    #[error("config file {}, line {line}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Where the config file is looked for when `--config` is not given:
/// `$XDG_CONFIG_HOME/twill/config.toml` when XDG_CONFIG_HOME is set (and not empty),
/// else `$HOME/.config/twill/config.toml`; `None` without either variable.
pub fn default_path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let config = var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("twill").join("config.toml"))
}

/// Loads the config file: `explicit` (from `--config`) must exist; the default file
/// may be missing, which yields empty settings. Returns the settings and the path read.
pub fn load(explicit: Option<&Path>) -> Result<(Settings, Option<PathBuf>), ConfigError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_path() {
            Some(p) => (p, false),
            None => return Ok((Settings::default(), None)),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if required {
                Err(ConfigError::Missing(path))
            } else {
                Ok((Settings::default(), None))
            };
        }
        Err(cause) => return Err(ConfigError::Read { path, cause }),
    };
    let settings = parse(&text, &path)?;
    Ok((settings, Some(path)))
}

/// Parses a config file's text; relative paths in it are taken relative to the
/// directory of `path`, and `~/` to the home directory.
pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let mut s: Settings = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|r| text[..r.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(1);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            message: e.message().trim().replace('\n', " "),
        }
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut s.tls_cert, &mut s.tls_key, &mut s.tls_ca]
        .into_iter()
        .flatten()
    {
        *p = resolve(p, base);
    }
    Ok(s)
}

fn resolve(p: &Path, base: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return PathBuf::from(home).join(rest);
        }
    }
    // An absolute path replaces `base` (Path::join).
    base.join(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_resolves_paths() {
        let s = parse(
            "controller = \"https://10.0.0.1:8474\"\n\
             tls_cert = \"admin.crt\"\n\
             tls_key = \"/etc/twill/admin.key\"\n\
             tls_ca = \"pki/ca.crt\"\n\
             tls_server_name = \"twill.example.com\"\n",
            Path::new("/home/a/.config/twill/config.toml"),
        )
        .unwrap();
        assert_eq!(s.controller.as_deref(), Some("https://10.0.0.1:8474"));
        assert_eq!(
            s.tls_cert.unwrap(),
            Path::new("/home/a/.config/twill/admin.crt")
        );
        assert_eq!(s.tls_key.unwrap(), Path::new("/etc/twill/admin.key"));
        assert_eq!(
            s.tls_ca.unwrap(),
            Path::new("/home/a/.config/twill/pki/ca.crt")
        );
        assert_eq!(s.tls_server_name.as_deref(), Some("twill.example.com"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let p = Path::new("/x/config.toml");
        let e = parse("controller = \"https://a:1\"\ntls_cert = \n", p).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("config file /x/config.toml, line 2: "),
            "{msg}"
        );
        let e = parse("\n\ntls-cert = \"a\"\n", p).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("config file /x/config.toml, line 3: "),
            "{msg}"
        );
        assert!(msg.contains("tls-cert"), "{msg}");
        let e = parse("controller = 5\n", p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn flags_win_over_file() {
        let flags = Settings {
            controller: Some("https://flag:1".into()),
            ..Default::default()
        };
        let file = Settings {
            controller: Some("https://file:1".into()),
            tls_ca: Some("ca.crt".into()),
            ..Default::default()
        };
        let s = flags.or(file);
        assert_eq!(s.controller.as_deref(), Some("https://flag:1"));
        assert_eq!(s.tls_ca.unwrap(), Path::new("ca.crt"));
    }

    #[test]
    fn missing_default_file_is_fine_but_explicit_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(Some(&dir.path().join("nope.toml"))).unwrap_err();
        assert!(matches!(e, ConfigError::Missing(_)), "{e}");
        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "# nothing\n").unwrap();
        let (s, p) = load(Some(&empty)).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(p.unwrap(), empty);
    }
}
