//! Parsing one variable's text: durations, booleans, addresses, Kubernetes names, the
//! workspace URL, paths, and the default instance name. Each error names the variable, the
//! value it got and what would be valid.

use super::ConfigError;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn invalid(var: &'static str, value: String, reason: String) -> ConfigError {
    ConfigError::Invalid { var, value, reason }
}

pub(super) fn boolean(var: &'static str, text: &str) -> Result<bool, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(invalid(
            var,
            text.to_string(),
            "expected true or false".into(),
        )),
    }
}

/// A Kubernetes object name (RFC 1123 subdomain; namespaces are labels, a subset the API
/// server checks itself).
pub(super) fn kube_name(var: &'static str, name: &str) -> Result<String, ConfigError> {
    let ok = name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(invalid(
            var,
            name.to_string(),
            "expected a Kubernetes object name: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit".into(),
        ));
    }
    Ok(name.to_string())
}

pub(super) fn seconds(
    var: &'static str,
    text: &str,
    zero_ok: bool,
) -> Result<Duration, ConfigError> {
    let what = if zero_ok {
        "a whole number of seconds, 0 or more"
    } else {
        "a whole number of seconds, 1 or more"
    };
    let n: u64 = text
        .parse()
        .map_err(|_| invalid(var, text.to_string(), format!("expected {what}")))?;
    if n == 0 && !zero_ok {
        return Err(invalid(var, text.to_string(), format!("expected {what}")));
    }
    if n > 10 * 365 * 24 * 3600 {
        return Err(invalid(
            var,
            text.to_string(),
            "expected at most ten years".into(),
        ));
    }
    Ok(Duration::from_secs(n))
}

pub(super) fn addr(var: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            var,
            text.to_string(),
            "expected IP:PORT, for example 127.0.0.1:9465".into(),
        )
    })
}

/// Validates `DATABRICKS_HOST` as `http(s)://host[:port]` with nothing after it. A missing
/// scheme means https, a trailing slash goes, and a workspace selector query (`?o=123`, what a
/// URL copied from the browser carries) is dropped with a note; any other path, query,
/// fragment, credentials, scheme or a bad port is an error, because the provider client
/// appends `/api/2.0/...` and would otherwise call somewhere else than the user meant.
pub(crate) fn parse_host(text: &str) -> Result<(String, Option<String>), String> {
    let text = text.trim();
    let candidate = if text.contains("://") {
        text.to_string()
    } else {
        format!("https://{text}")
    };
    let url = reqwest::Url::parse(&candidate).map_err(|e| {
        format!("not a URL ({e}); expected http(s)://host[:port], for example https://adb-123.azuredatabricks.net")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme {:?} is not supported; use https:// (or http:// for a local emulator)",
            url.scheme()
        ));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err("has no host name".into());
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; put the token in DATABRICKS_TOKEN".into());
    }
    if !matches!(url.path(), "" | "/") {
        return Err(format!(
            "has a path ({:?}); give only the workspace URL, http(s)://host[:port]",
            url.path()
        ));
    }
    if url.fragment().is_some() {
        return Err("has a #fragment; give only the workspace URL, http(s)://host[:port]".into());
    }
    let mut note = None;
    if let Some(query) = url.query() {
        let workspace_selector = query.split('&').all(|kv| {
            kv.strip_prefix("o=")
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        });
        if !workspace_selector {
            return Err(format!(
                "has a query ({query:?}); give only the workspace URL, http(s)://host[:port]"
            ));
        }
        note = Some(format!(
            "DATABRICKS_HOST: dropped the workspace selector ?{query} (the host alone names the workspace)"
        ));
    }
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let base = match url.port() {
        Some(0) => {
            return Err(
                "has port 0, which no workspace listens on; give the real port or none".into(),
            )
        }
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    Ok((base, note))
}

/// Trailing slashes go; a missing scheme means https; `http://` is kept as given.
pub(crate) fn normalize_host(host: &str) -> String {
    let trimmed = host.trim().trim_end_matches('/');
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("https://{trimmed}")
    }
}

pub(super) fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(rest),
            None => PathBuf::from(path),
        },
        None => PathBuf::from(path),
    }
}

/// The default `PAT_INSTANCE`: `<host name>-<first 8 hex of SHA-256(absolute config path,
/// NUL, profile)>`. The host name alone is shared by every rotator on one machine (other
/// files, other profiles of one file), and each reaps the tokens of its instance: with one
/// name, they revoke each other's live tokens.
pub(crate) fn default_instance(host: &str, config_file: &Path, profile: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::ffi::OsStrExt;
    let absolute = std::path::absolute(config_file).unwrap_or_else(|_| config_file.to_path_buf());
    let mut hasher = Sha256::new();
    hasher.update(absolute.as_os_str().as_bytes());
    hasher.update([0u8]);
    hasher.update(profile.as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{host}-{hex}")
}

pub(crate) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end]) {
            if !name.is_empty() {
                return name.replace(':', "-");
            }
        }
    }
    "unknown-host".to_string()
}
