//! Finding the delegate plugin in `CNI_PATH` and invoking it, as libcni's `invoke`
//! package does: same environment with `CNI_COMMAND` replaced, the delegate config on
//! stdin, its stdout captured, its stderr passed through, its error JSON decoded.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::error::{code, CniError};

/// `ETXTBSY`: the plugin binary is being written (e.g. by an install init container).
const ETXTBSY: i32 = 26;

/// Finds `plugin` (a bare name) in the colon-separated `cni_path`: the first regular file.
pub fn find_plugin(plugin: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!("invalid delegate plugin name {plugin:?}"),
        ));
    }
    let dirs: Vec<&str> = cni_path.split(':').filter(|d| !d.is_empty()).collect();
    for dir in &dirs {
        let candidate = Path::new(dir).join(plugin);
        if std::fs::metadata(&candidate).is_ok_and(|m| m.is_file()) {
            return Ok(candidate);
        }
    }
    Err(CniError::new(
        code::DELEGATE_FAILED,
        format!("failed to find delegate plugin {plugin:?} in CNI_PATH {dirs:?}"),
    ))
}

/// Runs `plugin` with `CNI_COMMAND=command` and `stdin`; returns its stdout on success.
/// On failure the plugin's own CNI error is returned with its code, the message prefixed
/// with the plugin's name.
pub fn invoke(plugin: &Path, command: &str, stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    invoke_with(plugin, command, stdin, &[])
}

/// [`invoke`] with `env` set for the delegate over what it inherits (GC's DELs name
/// the container and interface that the runtime's GC call does not).
pub fn invoke_with(
    plugin: &Path,
    command: &str,
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Result<Vec<u8>, CniError> {
    let name = plugin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let failed = |msg: String| CniError::new(code::DELEGATE_FAILED, msg);
    let mut attempt = 0;
    let mut child = loop {
        let spawned = Command::new(plugin)
            .env("CNI_COMMAND", command)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        match spawned {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                return Err(failed(format!(
                    "failed to run delegate plugin {}: {e}",
                    plugin.display()
                )))
            }
        }
    };
    // A plugin may exit without reading stdin; a broken pipe then is not our error.
    if let Some(mut pipe) = child.stdin.take() {
        if let Err(e) = pipe.write_all(stdin) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("failed to write to delegate {name}: {e}")));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("failed to wait for delegate {name}: {e}")))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(decode_error(&name, &out.stdout, &out.status.to_string()))
}

/// Turns a failed plugin's stdout into a [`CniError`], keeping its code.
fn decode_error(name: &str, stdout: &[u8], status: &str) -> CniError {
    let text = String::from_utf8_lossy(stdout);
    let parsed: Option<Value> = serde_json::from_slice(stdout).ok();
    match parsed
        .as_ref()
        .and_then(|v| Some((v, v.get("code")?.as_u64()?)))
    {
        Some((v, c)) => CniError::new(
            u32::try_from(c).unwrap_or(code::INTERNAL),
            format!(
                "delegate {name}: {}",
                v.get("msg").and_then(Value::as_str).unwrap_or("")
            ),
        )
        .with_details(v.get("details").and_then(Value::as_str).unwrap_or("")),
        None if text.trim().is_empty() => CniError::new(
            code::DELEGATE_FAILED,
            format!("delegate {name} failed ({status}) with no error message"),
        ),
        None => CniError::new(
            code::DELEGATE_FAILED,
            format!("delegate {name} failed ({status}) and its output is not a CNI error"),
        )
        .with_details(text.trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn finds_the_first_match_in_path() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        script(b.path(), "bridge", "true");
        let path = format!("{}:{}", a.path().display(), b.path().display());
        assert_eq!(
            find_plugin("bridge", &path).unwrap(),
            b.path().join("bridge")
        );
        let e = find_plugin("ipvlan", &path).unwrap_err();
        assert_eq!(e.code, code::DELEGATE_FAILED);
        assert!(e.msg.contains("ipvlan"));
        assert_eq!(
            find_plugin("../bin/sh", &path).unwrap_err().code,
            code::INVALID_NETWORK_CONFIG
        );
    }

    #[test]
    fn invokes_with_command_and_stdin() {
        let d = tempfile::tempdir().unwrap();
        script(
            d.path(),
            "echo",
            r#"printf '{"cmd":"%s","in":%s}' "$CNI_COMMAND" "$(cat)""#,
        );
        let out = invoke(&d.path().join("echo"), "ADD", br#"{"a":1}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, serde_json::json!({"cmd": "ADD", "in": {"a": 1}}));
    }

    #[test]
    fn passes_the_delegates_error_code_through() {
        let d = tempfile::tempdir().unwrap();
        script(
            d.path(),
            "bad",
            r#"echo '{"cniVersion":"1.0.0","code":7,"msg":"no bridge","details":"d"}'; exit 1"#,
        );
        let e = invoke(&d.path().join("bad"), "ADD", b"{}").unwrap_err();
        assert_eq!(e.code, 7);
        assert_eq!(e.msg, "delegate bad: no bridge");
        assert_eq!(e.details, "d");

        script(d.path(), "garbage", "echo boom; exit 2");
        let e = invoke(&d.path().join("garbage"), "DEL", b"{}").unwrap_err();
        assert_eq!(e.code, code::DELEGATE_FAILED);
        assert_eq!(e.details, "boom");

        script(d.path(), "silent", "exit 3");
        let e = invoke(&d.path().join("silent"), "DEL", b"{}").unwrap_err();
        assert!(e.msg.contains("no error message"), "{}", e.msg);
    }
}
