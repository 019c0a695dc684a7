//! The effective configuration, read once from the environment and validated before
//! anything is touched.
//!
//! Invariant: a [`Config`] that exists is valid. Every variable is collected as text with
//! `envy`, then parsed here so that an error can name the variable, the value it got and
//! what would be valid. Each value remembers whether it came from the environment or the
//! default, for `pat-rotator config`.

use crate::secret::{ControlSecret, Token};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Environment,
    Default,
}

/// One row of DESIGN's table: the variable, its default (as text) and what it means.
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// Every variable the product reads. `--help` and `config` are generated from this table.
pub const VARIABLES: &[Variable] = &[
    Variable { name: "DATABRICKS_HOST", default: "(none)", meaning: "workspace URL, http(s)://host[:port]; required for run, once and status --verify; set checks a token against it (or the profile's own host)" },
    Variable { name: "DATABRICKS_TOKEN", default: "(none)", meaning: "bootstrap token, used when the config file has none or its token is dead" },
    Variable { name: "DATABRICKS_CONFIG_FILE", default: "~/.databrickscfg", meaning: "the config file that readers use" },
    Variable { name: "DATABRICKS_CONFIG_PROFILE", default: "DEFAULT", meaning: "the profile whose token is rotated" },
    Variable { name: "PAT_TOKEN_LIFETIME", default: "900", meaning: "seconds each minted token lives" },
    Variable { name: "PAT_ROTATION_INTERVAL", default: "600", meaning: "seconds between rotations while sessions are active" },
    Variable { name: "PAT_REVOKE_GRACE", default: "30", meaning: "seconds the old token stays valid after the new one is on disk" },
    Variable { name: "PAT_SKIP_WHEN_IDLE", default: "true", meaning: "skip interval rotations while no session is active (near-expiry rotation always happens)" },
    Variable { name: "PAT_HTTP_TIMEOUT", default: "30", meaning: "seconds per provider request" },
    Variable { name: "PAT_WRITE_LOCK_WAIT", default: "35", meaning: "seconds a manual write waits for the lock; must exceed PAT_HTTP_TIMEOUT" },
    Variable { name: "PAT_LISTEN", default: "0.0.0.0:9464", meaning: "health, readiness and metrics (never a token)" },
    Variable { name: "PAT_CONTROL_LISTEN", default: "127.0.0.1:9465", meaning: "session leases and the SDK metadata-service token endpoint" },
    Variable { name: "PAT_SESSION_TTL", default: "120", meaning: "seconds a session lease lives without a heartbeat" },
    Variable { name: "PAT_TOKEN_COMMENT", default: "pat-rotator", meaning: "comment prefix on minted tokens (<prefix>:<instance>)" },
    Variable { name: "PAT_INSTANCE", default: "<host name>-<8 hex of SHA-256(config path, profile)>", meaning: "this rotator's identity in token comments; only its own tokens are reaped, so rotators of other files or profiles on one host never revoke each other's" },
    Variable { name: "PAT_LOG_FORMAT", default: "text", meaning: "text or json; RUST_LOG filters" },
    Variable { name: "PAT_ON_ROTATE", default: "(none)", meaning: "command (argv split, no shell) run after each new token is on disk; gets fingerprint and expiry, never the token" },
    Variable { name: "PAT_PROXY_LISTEN", default: "(off)", meaning: "loopback address of the authenticating proxy: http://ADDR/<secret>/<path> is forwarded to DATABRICKS_HOST/<path> with the current token" },
    Variable { name: "PAT_STORE", default: "file", meaning: "where the credential lives: file (the config file), or kubernetes (a Secret shared by every replica, mirrored into each one's config file; a Lease elects the one that rotates)" },
    Variable { name: "PAT_KUBE_SECRET", default: "databricks-pat", meaning: "cluster store: the Secret that holds the current token (keys token and state)" },
    Variable { name: "PAT_KUBE_NAMESPACE", default: "(the pod's, or the kubeconfig context's)", meaning: "cluster store: namespace of the Secret and the Lease" },
    Variable { name: "PAT_KUBE_LEASE", default: "<PAT_KUBE_SECRET>-rotation", meaning: "cluster store: the coordination.k8s.io/v1 Lease that elects the replica that rotates" },
    Variable { name: "PAT_REVOKE_SEED", default: "false", meaning: "revoke a seed token (one the rotator did not mint) once it has been replaced and the grace has passed" },
    Variable { name: "PAT_CONTROL_SECRET", default: "(random at each start)", meaning: "the capability in the URLs that hand out tokens (32+ URL-safe characters); the URLs are in <config>.control.json and `status --json`" },
];

/// The variables exactly as found in the environment. Collected with `envy`, parsed below.
#[derive(Debug, Default, Deserialize)]
struct RawEnv {
    databricks_host: Option<String>,
    databricks_token: Option<String>,
    databricks_config_file: Option<String>,
    databricks_config_profile: Option<String>,
    pat_token_lifetime: Option<String>,
    pat_rotation_interval: Option<String>,
    pat_revoke_grace: Option<String>,
    pat_skip_when_idle: Option<String>,
    pat_http_timeout: Option<String>,
    pat_write_lock_wait: Option<String>,
    pat_listen: Option<String>,
    pat_control_listen: Option<String>,
    pat_session_ttl: Option<String>,
    pat_token_comment: Option<String>,
    pat_instance: Option<String>,
    pat_log_format: Option<String>,
    pat_on_rotate: Option<String>,
    pat_control_secret: Option<String>,
    pat_proxy_listen: Option<String>,
    pat_store: Option<String>,
    pat_kube_secret: Option<String>,
    pat_kube_namespace: Option<String>,
    pat_kube_lease: Option<String>,
    pat_revoke_seed: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("could not read the environment: {0}")]
    Environment(String),
    #[error("{var} is not set: {reason}")]
    Missing {
        var: &'static str,
        reason: &'static str,
    },
}

/// Where the credential lives (`PAT_STORE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// The config file alone.
    File,
    /// A Kubernetes Secret and Lease, mirrored into the config file.
    Kubernetes(KubeTarget),
}

/// The cluster store's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    pub secret: String,
    /// `None`: the pod's namespace (or the kubeconfig context's), known once connected.
    pub namespace: Option<String>,
    pub lease: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: Option<String>,
    pub bootstrap_token: Option<Token>,
    pub config_file: PathBuf,
    pub profile: String,
    pub token_lifetime: Duration,
    pub rotation_interval: Duration,
    pub revoke_grace: Duration,
    pub skip_when_idle: bool,
    pub http_timeout: Duration,
    pub write_lock_wait: Duration,
    pub listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub session_ttl: Duration,
    pub token_comment: String,
    pub instance: String,
    pub log_format: LogFormat,
    pub on_rotate: Option<Vec<String>>,
    /// The authenticating proxy's listener, when on.
    pub proxy_listen: Option<SocketAddr>,
    /// The capability path segment of every URL that hands out a token.
    pub control_secret: ControlSecret,
    /// Where the credential lives.
    pub store: StoreKind,
    /// Revoke a replaced token the rotator did not mint (a seed).
    pub revoke_seed: bool,
    /// Which variables were set in the environment (the rest are defaults).
    sources: Vec<(&'static str, Source)>,
    /// Non-fatal findings, such as a margin shorter than one HTTP timeout.
    pub warnings: Vec<String>,
}

impl From<&Config> for crate::policy::PolicyConfig {
    fn from(c: &Config) -> Self {
        crate::policy::PolicyConfig::new(
            chrono::TimeDelta::seconds(c.rotation_interval.as_secs() as i64),
            c.skip_when_idle,
        )
    }
}

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let raw: RawEnv = envy::from_env().map_err(|e| ConfigError::Environment(e.to_string()))?;
        Config::from_raw(raw)
    }

    /// Reads and validates an explicit set of variables (tests, the soak's children).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let raw: RawEnv = envy::from_iter(vars.into_iter().map(|(k, v)| (k.into(), v.into())))
            .map_err(|e| ConfigError::Environment(e.to_string()))?;
        Config::from_raw(raw)
    }

    fn from_raw(raw: RawEnv) -> Result<Config, ConfigError> {
        let mut sources = Vec::new();
        let mut note = |name: &'static str, v: &Option<String>| {
            let src = if v.as_deref().is_some_and(|s| !s.is_empty()) {
                Source::Environment
            } else {
                Source::Default
            };
            sources.push((name, src));
        };
        note("DATABRICKS_HOST", &raw.databricks_host);
        note("DATABRICKS_TOKEN", &raw.databricks_token);
        note("DATABRICKS_CONFIG_FILE", &raw.databricks_config_file);
        note("DATABRICKS_CONFIG_PROFILE", &raw.databricks_config_profile);
        note("PAT_TOKEN_LIFETIME", &raw.pat_token_lifetime);
        note("PAT_ROTATION_INTERVAL", &raw.pat_rotation_interval);
        note("PAT_REVOKE_GRACE", &raw.pat_revoke_grace);
        note("PAT_SKIP_WHEN_IDLE", &raw.pat_skip_when_idle);
        note("PAT_HTTP_TIMEOUT", &raw.pat_http_timeout);
        note("PAT_WRITE_LOCK_WAIT", &raw.pat_write_lock_wait);
        note("PAT_LISTEN", &raw.pat_listen);
        note("PAT_CONTROL_LISTEN", &raw.pat_control_listen);
        note("PAT_SESSION_TTL", &raw.pat_session_ttl);
        note("PAT_TOKEN_COMMENT", &raw.pat_token_comment);
        note("PAT_INSTANCE", &raw.pat_instance);
        note("PAT_LOG_FORMAT", &raw.pat_log_format);
        note("PAT_ON_ROTATE", &raw.pat_on_rotate);
        note("PAT_CONTROL_SECRET", &raw.pat_control_secret);
        note("PAT_PROXY_LISTEN", &raw.pat_proxy_listen);
        note("PAT_STORE", &raw.pat_store);
        note("PAT_KUBE_SECRET", &raw.pat_kube_secret);
        note("PAT_KUBE_NAMESPACE", &raw.pat_kube_namespace);
        note("PAT_KUBE_LEASE", &raw.pat_kube_lease);
        note("PAT_REVOKE_SEED", &raw.pat_revoke_seed);

        let token_lifetime = seconds("PAT_TOKEN_LIFETIME", &raw.pat_token_lifetime, 900, false)?;
        let rotation_interval = seconds(
            "PAT_ROTATION_INTERVAL",
            &raw.pat_rotation_interval,
            600,
            false,
        )?;
        let revoke_grace = seconds("PAT_REVOKE_GRACE", &raw.pat_revoke_grace, 30, true)?;
        let http_timeout = seconds("PAT_HTTP_TIMEOUT", &raw.pat_http_timeout, 30, false)?;
        let write_lock_wait = seconds("PAT_WRITE_LOCK_WAIT", &raw.pat_write_lock_wait, 35, false)?;
        let session_ttl = seconds("PAT_SESSION_TTL", &raw.pat_session_ttl, 120, false)?;

        if rotation_interval >= token_lifetime {
            return Err(invalid(
                "PAT_ROTATION_INTERVAL",
                rotation_interval.as_secs().to_string(),
                format!(
                    "must be shorter than PAT_TOKEN_LIFETIME ({}s)",
                    token_lifetime.as_secs()
                ),
            ));
        }
        let threshold = crate::policy::threshold(rotation_interval);
        if token_lifetime <= threshold {
            return Err(invalid(
                "PAT_TOKEN_LIFETIME",
                token_lifetime.as_secs().to_string(),
                format!(
                    "must be longer than the rotation threshold min(PAT_ROTATION_INTERVAL, 60s) = {}s, or every wake-up would rotate",
                    threshold.as_secs()
                ),
            ));
        }
        if write_lock_wait <= http_timeout {
            return Err(invalid(
                "PAT_WRITE_LOCK_WAIT",
                write_lock_wait.as_secs().to_string(),
                format!(
                    "must exceed PAT_HTTP_TIMEOUT ({}s): a manual write has to outlast one provider request",
                    http_timeout.as_secs()
                ),
            ));
        }

        let skip_when_idle = boolean("PAT_SKIP_WHEN_IDLE", &raw.pat_skip_when_idle, true)?;
        let revoke_seed = boolean("PAT_REVOKE_SEED", &raw.pat_revoke_seed, false)?;
        let listen = addr("PAT_LISTEN", &raw.pat_listen, "0.0.0.0:9464")?;
        let control_listen = addr(
            "PAT_CONTROL_LISTEN",
            &raw.pat_control_listen,
            "127.0.0.1:9465",
        )?;
        if !control_listen.ip().is_loopback() {
            return Err(invalid(
                "PAT_CONTROL_LISTEN",
                control_listen.to_string(),
                "must be a loopback address such as 127.0.0.1:9465 or [::1]:9465: it hands out tokens".into(),
            ));
        }
        let log_format = match non_empty(&raw.pat_log_format)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "PAT_LOG_FORMAT",
                    other.to_string(),
                    "expected text or json".into(),
                ))
            }
        };
        let on_rotate = match non_empty(&raw.pat_on_rotate) {
            None => None,
            Some(cmd) => {
                let argv = shell_words::split(cmd).map_err(|e| {
                    invalid(
                        "PAT_ON_ROTATE",
                        cmd.to_string(),
                        format!("cannot split into arguments: {e}"),
                    )
                })?;
                if argv.is_empty() {
                    None
                } else {
                    Some(argv)
                }
            }
        };
        let token_comment = non_empty(&raw.pat_token_comment)
            .unwrap_or("pat-rotator")
            .to_string();
        if token_comment.contains(':') {
            return Err(invalid(
                "PAT_TOKEN_COMMENT",
                token_comment,
                "must not contain ':' (it separates prefix and instance)".into(),
            ));
        }
        let mut warnings = Vec::new();
        let host = match non_empty(&raw.databricks_host) {
            None => None,
            Some(text) => {
                let (host, note) = parse_host(text)
                    .map_err(|reason| invalid("DATABRICKS_HOST", text.to_string(), reason))?;
                warnings.extend(note);
                Some(host)
            }
        };
        let profile = non_empty(&raw.databricks_config_profile)
            .unwrap_or("DEFAULT")
            .to_string();
        if let Some(bad) = profile
            .chars()
            .find(|c| matches!(c, '[' | ']') || c.is_control())
        {
            return Err(invalid(
                "DATABRICKS_CONFIG_PROFILE",
                profile.clone(),
                format!(
                    "a section name cannot hold {:?}: it would break the config file for every reader; use letters, digits, '-', '_' or '.'",
                    bad.escape_default().to_string()
                ),
            ));
        }
        let store = match non_empty(&raw.pat_store)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("file") => StoreKind::File,
            Some("kubernetes") => {
                let secret = kube_name("PAT_KUBE_SECRET", &raw.pat_kube_secret)?
                    .unwrap_or_else(|| "databricks-pat".into());
                let lease = kube_name("PAT_KUBE_LEASE", &raw.pat_kube_lease)?
                    .unwrap_or_else(|| format!("{secret}-rotation"));
                StoreKind::Kubernetes(KubeTarget {
                    namespace: kube_name("PAT_KUBE_NAMESPACE", &raw.pat_kube_namespace)?,
                    secret,
                    lease,
                })
            }
            Some(other) => {
                return Err(invalid(
                    "PAT_STORE",
                    other.to_string(),
                    "expected file or kubernetes".into(),
                ))
            }
        };
        let proxy_listen = match non_empty(&raw.pat_proxy_listen) {
            None => None,
            Some(_) => {
                let a = addr("PAT_PROXY_LISTEN", &raw.pat_proxy_listen, "")?;
                if !a.ip().is_loopback() {
                    return Err(invalid(
                        "PAT_PROXY_LISTEN",
                        a.to_string(),
                        "must be a loopback address such as 127.0.0.1:9466: it authenticates whatever reaches it".into(),
                    ));
                }
                Some(a)
            }
        };
        let control_secret = match non_empty(&raw.pat_control_secret) {
            None => ControlSecret::random(),
            Some(text) => ControlSecret::parse(text).map_err(|reason| {
                // The value is a credential: never echo it back.
                invalid("PAT_CONTROL_SECRET", "[redacted]".into(), reason)
            })?,
        };
        if control_listen.is_ipv6() {
            warnings.push(format!(
                "PAT_CONTROL_LISTEN={control_listen} is IPv6: the Python SDK accepts it, but the Go SDK and the Databricks CLI accept only localhost or 127.0.0.1 metadata URLs; use 127.0.0.1 if they must connect"
            ));
        }
        let config_file = match non_empty(&raw.databricks_config_file) {
            Some(p) => expand_home(p),
            None => expand_home("~/.databrickscfg"),
        };
        let instance = non_empty(&raw.pat_instance)
            .map(str::to_string)
            .unwrap_or_else(|| default_instance(&host_name(), &config_file, &profile));

        let margin = token_lifetime - threshold;
        if margin < http_timeout {
            warnings.push(format!(
                "PAT_TOKEN_LIFETIME - threshold leaves {}s, shorter than PAT_HTTP_TIMEOUT ({}s): one slow request can use up the margin; fine for compressed soak settings, not for production",
                margin.as_secs(),
                http_timeout.as_secs()
            ));
        }

        Ok(Config {
            host,
            bootstrap_token: non_empty(&raw.databricks_token).map(Token::new),
            config_file,
            profile,
            token_lifetime,
            rotation_interval,
            revoke_grace,
            skip_when_idle,
            http_timeout,
            write_lock_wait,
            listen,
            control_listen,
            session_ttl,
            token_comment,
            instance,
            log_format,
            on_rotate,
            proxy_listen,
            control_secret,
            store,
            revoke_seed,
            sources,
            warnings,
        })
    }

    /// `min(PAT_ROTATION_INTERVAL, 60s)`: below this remaining lifetime a rotation is forced.
    pub fn threshold(&self) -> Duration {
        crate::policy::threshold(self.rotation_interval)
    }

    /// The comment every token minted by this instance carries.
    pub fn token_comment_full(&self) -> String {
        format!("{}:{}", self.token_comment, self.instance)
    }

    pub fn require_host(&self) -> Result<&str, ConfigError> {
        self.host.as_deref().ok_or(ConfigError::Missing {
            var: "DATABRICKS_HOST",
            reason: "set it to the workspace URL, for example https://adb-123.azuredatabricks.net",
        })
    }

    pub fn source_of(&self, var: &str) -> Source {
        self.sources
            .iter()
            .find(|(n, _)| *n == var)
            .map(|(_, s)| *s)
            .unwrap_or(Source::Default)
    }

    /// Each variable with its effective value (secrets as a fingerprint) and its source.
    pub fn describe(&self) -> Vec<(&'static str, String, Source)> {
        let secs = |d: Duration| d.as_secs().to_string();
        VARIABLES
            .iter()
            .map(|v| {
                let value = match v.name {
                    "DATABRICKS_HOST" => self.host.clone().unwrap_or_else(|| "(unset)".into()),
                    "DATABRICKS_TOKEN" => self
                        .bootstrap_token
                        .as_ref()
                        .map(|t| t.fingerprint())
                        .unwrap_or_else(|| "(unset)".into()),
                    "DATABRICKS_CONFIG_FILE" => self.config_file.display().to_string(),
                    "DATABRICKS_CONFIG_PROFILE" => self.profile.clone(),
                    "PAT_TOKEN_LIFETIME" => secs(self.token_lifetime),
                    "PAT_ROTATION_INTERVAL" => secs(self.rotation_interval),
                    "PAT_REVOKE_GRACE" => secs(self.revoke_grace),
                    "PAT_SKIP_WHEN_IDLE" => self.skip_when_idle.to_string(),
                    "PAT_HTTP_TIMEOUT" => secs(self.http_timeout),
                    "PAT_WRITE_LOCK_WAIT" => secs(self.write_lock_wait),
                    "PAT_LISTEN" => self.listen.to_string(),
                    "PAT_CONTROL_LISTEN" => self.control_listen.to_string(),
                    "PAT_SESSION_TTL" => secs(self.session_ttl),
                    "PAT_TOKEN_COMMENT" => self.token_comment.clone(),
                    "PAT_INSTANCE" => self.instance.clone(),
                    "PAT_LOG_FORMAT" => format!("{:?}", self.log_format).to_lowercase(),
                    "PAT_ON_ROTATE" => self
                        .on_rotate
                        .as_ref()
                        .map(shell_words::join)
                        .unwrap_or_else(|| "(unset)".into()),
                    "PAT_STORE" => match &self.store {
                        StoreKind::File => "file".into(),
                        StoreKind::Kubernetes(_) => "kubernetes".into(),
                    },
                    "PAT_KUBE_SECRET" | "PAT_KUBE_NAMESPACE" | "PAT_KUBE_LEASE" => {
                        match &self.store {
                            StoreKind::File => "(unused: PAT_STORE=file)".into(),
                            StoreKind::Kubernetes(k) => match v.name {
                                "PAT_KUBE_SECRET" => k.secret.clone(),
                                "PAT_KUBE_LEASE" => k.lease.clone(),
                                _ => k.namespace.clone().unwrap_or_else(|| {
                                    "(the pod's, or the kubeconfig context's)".into()
                                }),
                            },
                        }
                    }
                    "PAT_REVOKE_SEED" => self.revoke_seed.to_string(),
                    "PAT_PROXY_LISTEN" => self
                        .proxy_listen
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "(off)".into()),
                    "PAT_CONTROL_SECRET" => match self.source_of(v.name) {
                        Source::Environment => "(set; never shown)".into(),
                        Source::Default => "(random at each start)".into(),
                    },
                    _ => String::new(),
                };
                (v.name, value, self.source_of(v.name))
            })
            .collect()
    }
}

fn boolean(var: &'static str, v: &Option<String>, default: bool) -> Result<bool, ConfigError> {
    match non_empty(v).map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(invalid(
            var,
            other.to_string(),
            "expected true or false".into(),
        )),
    }
}

/// A Kubernetes object name (RFC 1123 subdomain; namespaces are labels, a subset the API
/// server checks itself).
fn kube_name(var: &'static str, v: &Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(name) = non_empty(v) else {
        return Ok(None);
    };
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
    Ok(Some(name.to_string()))
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn invalid(var: &'static str, value: String, reason: String) -> ConfigError {
    ConfigError::Invalid { var, value, reason }
}

fn seconds(
    var: &'static str,
    v: &Option<String>,
    default: u64,
    zero_ok: bool,
) -> Result<Duration, ConfigError> {
    let Some(text) = non_empty(v) else {
        return Ok(Duration::from_secs(default));
    };
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

fn addr(var: &'static str, v: &Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = non_empty(v).unwrap_or(default);
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
pub fn parse_host(text: &str) -> Result<(String, Option<String>), String> {
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
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    Ok((base, note))
}

/// Trailing slashes go; a missing scheme means https; `http://` is kept as given.
pub fn normalize_host(host: &str) -> String {
    let trimmed = host.trim().trim_end_matches('/');
    if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("https://{trimmed}")
    }
}

fn expand_home(path: &str) -> PathBuf {
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

fn host_name() -> String {
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

mod child_env;
#[cfg(test)]
mod tests;

pub use child_env::ChildEnv;
