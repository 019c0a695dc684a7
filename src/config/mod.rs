//! The effective configuration, read once from the environment and validated before
//! anything is touched.
//!
//! Invariant: a [`Config`] that exists is valid. Every variable of the table
//! (`variables.rs`, where each is defined once) is collected as text with `envy`, then
//! parsed here so that an error can name the variable, the value it got and what would be
//! valid. Each value remembers whether it came from the environment or the default, for
//! `pat-rotator config`.

use crate::secret::{ControlSecret, Token};
pub(crate) use parse::host_name;
use parse::{addr, boolean, expand_home, invalid, kube_name, seconds};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod child_env;
mod credential;
mod parse;
#[cfg(test)]
mod tests;
mod variables;

pub use child_env::{ChildEnv, ChildOAuth};
use credential::credential;
pub use credential::CredentialKind;
pub(crate) use parse::default_instance;
pub(crate) use parse::{normalize_host, parse_host};
pub use variables::{secret_names, Parse, Variable, VARIABLES};

/// The instance a rotator of `profile` in `config_file` on this machine takes by default.
pub(crate) fn instance_for(config_file: &std::path::Path, profile: &str) -> String {
    default_instance(&host_name(), config_file, profile)
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Environment,
    Default,
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

impl StoreKind {
    /// The `PAT_STORE` value that names it.
    pub fn name(&self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::Kubernetes(_) => "kubernetes",
        }
    }
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
    /// What kind of credential is kept.
    pub credential: CredentialKind,
    /// `pat-rotator login`'s loopback redirect port.
    pub login_port: u16,
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

/// The environment reduced to the table's variables: what was set (trimmed, non-empty),
/// else the table's literal default.
struct Env {
    set: HashMap<&'static str, String>,
}

impl Env {
    /// `raw` as `envy` collects it: every variable of the process, names in lower case.
    fn new(raw: HashMap<String, String>) -> Env {
        let set = VARIABLES
            .iter()
            .filter_map(|v| {
                let text = raw.get(&v.name.to_ascii_lowercase())?.trim();
                (!text.is_empty()).then(|| (v.name, text.to_string()))
            })
            .collect();
        Env { set }
    }

    /// The value set in the environment.
    fn set(&self, name: &str) -> Option<&str> {
        self.set.get(name).map(String::as_str)
    }

    /// The value set, else the table's literal default.
    fn text(&self, name: &str) -> Option<&str> {
        self.set(name)
            .or_else(|| variables::variable(name).literal_default())
    }

    /// The variable's parse, from its definition.
    fn parse_of(name: &str) -> Parse {
        variables::variable(name).parse
    }

    /// Whole seconds, by the variable's definition (whether 0 is accepted).
    fn seconds(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let zero_ok = Env::parse_of(name) == Parse::Seconds { zero_ok: true };
        seconds(name, self.text(name).unwrap_or_default(), zero_ok)
    }

    fn boolean(&self, name: &'static str) -> Result<bool, ConfigError> {
        boolean(name, self.text(name).unwrap_or_default())
    }

    /// An address, loopback only when the definition says why.
    fn address(&self, name: &'static str) -> Result<Option<SocketAddr>, ConfigError> {
        let Some(a) = self.text(name).map(|t| addr(name, t)).transpose()? else {
            return Ok(None);
        };
        match Env::parse_of(name) {
            Parse::Address {
                loopback_because: Some(why),
            } if !a.ip().is_loopback() => Err(invalid(
                name,
                a.to_string(),
                format!(
                    "must be a loopback address such as 127.0.0.1:{}: {why}",
                    a.port()
                ),
            )),
            _ => Ok(Some(a)),
        }
    }

    fn kube_name(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        self.text(name).map(|n| kube_name(name, n)).transpose()
    }

    /// One of the definition's words (any case), as the definition spells it.
    fn choice(&self, name: &'static str) -> Result<Option<&'static str>, ConfigError> {
        let Parse::OneOf(words) = Env::parse_of(name) else {
            return Ok(None);
        };
        let Some(text) = self.text(name) else {
            return Ok(None);
        };
        match words.iter().find(|w| w.eq_ignore_ascii_case(text)) {
            Some(word) => Ok(Some(word)),
            None => Err(invalid(
                name,
                text.to_string(),
                match words.split_last() {
                    Some((last, [])) => format!("expected {last}"),
                    Some((last, rest)) => format!("expected {} or {last}", rest.join(", ")),
                    None => "expected nothing".into(),
                },
            )),
        }
    }

    /// A TCP port, 1 to 65535.
    fn port(&self, name: &'static str) -> Result<u16, ConfigError> {
        let text = self.text(name).unwrap_or_default();
        match text.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(invalid(
                name,
                text.to_string(),
                "expected a TCP port, 1 to 65535".into(),
            )),
        }
    }

    fn source(&self, name: &str) -> Source {
        if self.set.contains_key(name) {
            Source::Environment
        } else {
            Source::Default
        }
    }
}

/// The durations, checked against each other.
struct Timings {
    token_lifetime: Duration,
    rotation_interval: Duration,
    revoke_grace: Duration,
    http_timeout: Duration,
    write_lock_wait: Duration,
    session_ttl: Duration,
}

impl Timings {
    fn read(env: &Env, warnings: &mut Vec<String>) -> Result<Timings, ConfigError> {
        let t = Timings {
            token_lifetime: env.seconds("PAT_TOKEN_LIFETIME")?,
            rotation_interval: env.seconds("PAT_ROTATION_INTERVAL")?,
            revoke_grace: env.seconds("PAT_REVOKE_GRACE")?,
            http_timeout: env.seconds("PAT_HTTP_TIMEOUT")?,
            write_lock_wait: env.seconds("PAT_WRITE_LOCK_WAIT")?,
            session_ttl: env.seconds("PAT_SESSION_TTL")?,
        };
        if t.rotation_interval >= t.token_lifetime {
            return Err(invalid(
                "PAT_ROTATION_INTERVAL",
                t.rotation_interval.as_secs().to_string(),
                format!(
                    "must be shorter than PAT_TOKEN_LIFETIME ({}s)",
                    t.token_lifetime.as_secs()
                ),
            ));
        }
        let threshold = crate::policy::threshold(t.rotation_interval);
        if t.token_lifetime <= threshold {
            return Err(invalid(
                "PAT_TOKEN_LIFETIME",
                t.token_lifetime.as_secs().to_string(),
                format!(
                    "must be longer than the rotation threshold min(PAT_ROTATION_INTERVAL, 60s) = {}s, or every wake-up would rotate",
                    threshold.as_secs()
                ),
            ));
        }
        if t.write_lock_wait <= t.http_timeout {
            return Err(invalid(
                "PAT_WRITE_LOCK_WAIT",
                t.write_lock_wait.as_secs().to_string(),
                format!(
                    "must exceed PAT_HTTP_TIMEOUT ({}s): a manual write has to outlast one provider request",
                    t.http_timeout.as_secs()
                ),
            ));
        }
        if t.http_timeout > MAX_HTTP_TIMEOUT {
            return Err(invalid(
                "PAT_HTTP_TIMEOUT",
                t.http_timeout.as_secs().to_string(),
                format!(
                    "must be at most {}s: a request that may wait longer outlives the forced window it was sent in and the stop's deadline",
                    MAX_HTTP_TIMEOUT.as_secs()
                ),
            ));
        }
        let margin = t.token_lifetime - threshold;
        if margin < t.http_timeout {
            warnings.push(format!(
                "PAT_TOKEN_LIFETIME - threshold leaves {}s, shorter than PAT_HTTP_TIMEOUT ({}s): one slow request can use up the margin; fine for compressed soak settings, not for production",
                margin.as_secs(),
                t.http_timeout.as_secs()
            ));
        }
        Ok(t)
    }
}

/// The listeners: the public one, and the two that hand out tokens (loopback only).
struct Listeners {
    listen: SocketAddr,
    control_listen: SocketAddr,
    proxy_listen: Option<SocketAddr>,
}

impl Listeners {
    fn read(env: &Env, warnings: &mut Vec<String>) -> Result<Listeners, ConfigError> {
        // Both have a literal default in the table, so the text is always there; the
        // loopback rule of the two that hand out tokens is in their definitions.
        let missing = |var: &'static str| ConfigError::Missing {
            var,
            reason: "an address such as 127.0.0.1:9465",
        };
        let listen = env
            .address("PAT_LISTEN")?
            .ok_or_else(|| missing("PAT_LISTEN"))?;
        let control_listen = env
            .address("PAT_CONTROL_LISTEN")?
            .ok_or_else(|| missing("PAT_CONTROL_LISTEN"))?;
        if control_listen.is_ipv6() {
            warnings.push(format!(
                "PAT_CONTROL_LISTEN={control_listen} is IPv6: the Python SDK accepts it, but the Go SDK and the Databricks CLI accept only localhost or 127.0.0.1 metadata URLs; use 127.0.0.1 if they must connect"
            ));
        }
        let proxy_listen = env.address("PAT_PROXY_LISTEN")?;
        Ok(Listeners {
            listen,
            control_listen,
            proxy_listen,
        })
    }
}

fn log_format(env: &Env) -> Result<LogFormat, ConfigError> {
    Ok(match env.choice("PAT_LOG_FORMAT")? {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    })
}

fn on_rotate(env: &Env) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(cmd) = env.set("PAT_ON_ROTATE") else {
        return Ok(None);
    };
    let argv = shell_words::split(cmd).map_err(|e| {
        invalid(
            "PAT_ON_ROTATE",
            cmd.to_string(),
            format!("cannot split into arguments: {e}"),
        )
    })?;
    Ok((!argv.is_empty()).then_some(argv))
}

/// The longest `PAT_HTTP_TIMEOUT`.
const MAX_HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The longest `PAT_TOKEN_COMMENT`: a prefix, not a description.
const MAX_COMMENT_PREFIX: usize = 64;

fn token_comment(env: &Env) -> Result<String, ConfigError> {
    let comment = env
        .text("PAT_TOKEN_COMMENT")
        .unwrap_or_default()
        .to_string();
    if comment.chars().count() > MAX_COMMENT_PREFIX {
        return Err(invalid(
            "PAT_TOKEN_COMMENT",
            format!("{}...", comment.chars().take(20).collect::<String>()),
            format!("is {} characters; keep it to {MAX_COMMENT_PREFIX} (it prefixes every token's comment, which the workspace lists and truncates)", comment.chars().count()),
        ));
    }
    if comment.contains(':') {
        return Err(invalid(
            "PAT_TOKEN_COMMENT",
            comment,
            "must not contain ':' (it separates prefix and instance)".into(),
        ));
    }
    Ok(comment)
}

fn host(env: &Env, warnings: &mut Vec<String>) -> Result<Option<String>, ConfigError> {
    let Some(text) = env.set("DATABRICKS_HOST") else {
        return Ok(None);
    };
    let (host, note) =
        parse_host(text).map_err(|reason| invalid("DATABRICKS_HOST", text.to_string(), reason))?;
    warnings.extend(note);
    Ok(Some(host))
}

fn profile(env: &Env) -> Result<String, ConfigError> {
    let profile = env
        .text("DATABRICKS_CONFIG_PROFILE")
        .unwrap_or_default()
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
    Ok(profile)
}

fn store(env: &Env) -> Result<StoreKind, ConfigError> {
    match env.choice("PAT_STORE")? {
        Some("kubernetes") => {
            let secret = env.kube_name("PAT_KUBE_SECRET")?.unwrap_or_default();
            let lease = env
                .kube_name("PAT_KUBE_LEASE")?
                .unwrap_or_else(|| format!("{secret}-rotation"));
            Ok(StoreKind::Kubernetes(KubeTarget {
                namespace: env.kube_name("PAT_KUBE_NAMESPACE")?,
                secret,
                lease,
            }))
        }
        _ => Ok(StoreKind::File),
    }
}

fn control_secret(env: &Env) -> Result<ControlSecret, ConfigError> {
    match env.set("PAT_CONTROL_SECRET") {
        None => Ok(ControlSecret::random()),
        Some(text) => ControlSecret::parse(text).map_err(|reason| {
            // The value is a credential: never echo it back.
            invalid("PAT_CONTROL_SECRET", "[redacted]".into(), reason)
        }),
    }
}

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let raw: HashMap<String, String> =
            envy::from_env().map_err(|e| ConfigError::Environment(e.to_string()))?;
        Config::read(Env::new(raw))
    }

    /// Reads and validates an explicit set of variables (tests, the soak's children).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let raw: HashMap<String, String> =
            envy::from_iter(vars.into_iter().map(|(k, v)| (k.into(), v.into())))
                .map_err(|e| ConfigError::Environment(e.to_string()))?;
        Config::read(Env::new(raw))
    }

    fn read(env: Env) -> Result<Config, ConfigError> {
        let mut warnings = Vec::new();
        let t = Timings::read(&env, &mut warnings)?;
        let l = Listeners::read(&env, &mut warnings)?;
        let host = host(&env, &mut warnings)?;
        let profile = profile(&env)?;
        let config_file = expand_home(env.text("DATABRICKS_CONFIG_FILE").unwrap_or_default());
        let instance = env
            .set("PAT_INSTANCE")
            .map(str::to_string)
            .unwrap_or_else(|| default_instance(&host_name(), &config_file, &profile));

        let store = store(&env)?;
        let credential = credential(&env, &mut warnings)?;
        Ok(Config {
            host,
            bootstrap_token: env.set("DATABRICKS_TOKEN").map(Token::new),
            config_file,
            profile,
            token_lifetime: t.token_lifetime,
            rotation_interval: t.rotation_interval,
            revoke_grace: t.revoke_grace,
            skip_when_idle: env.boolean("PAT_SKIP_WHEN_IDLE")?,
            http_timeout: t.http_timeout,
            write_lock_wait: t.write_lock_wait,
            listen: l.listen,
            control_listen: l.control_listen,
            session_ttl: t.session_ttl,
            token_comment: token_comment(&env)?,
            instance,
            log_format: log_format(&env)?,
            on_rotate: on_rotate(&env)?,
            proxy_listen: l.proxy_listen,
            control_secret: control_secret(&env)?,
            store,
            revoke_seed: env.boolean("PAT_REVOKE_SEED")?,
            credential,
            login_port: env.port("PAT_LOGIN_PORT")?,
            sources: VARIABLES
                .iter()
                .map(|v| (v.name, env.source(v.name)))
                .collect(),
            warnings,
        })
    }

    /// `min(PAT_ROTATION_INTERVAL, 60s)`: below this remaining lifetime a rotation is forced.
    pub fn threshold(&self) -> Duration {
        crate::policy::threshold(self.rotation_interval)
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
        VARIABLES
            .iter()
            .map(|v| (v.name, (v.show)(self), self.source_of(v.name)))
            .collect()
    }
}
