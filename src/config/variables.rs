//! Every variable the product reads, each defined once: its name, its default, what it
//! means, how `pat-rotator config` shows its effective value, and what a rotator started by
//! another program ([`ChildEnv`]) gets. `--help`, `config`, the manual page, `ChildEnv::vars`
//! and the README's table (a test compares them) all come from [`VARIABLES`], and the parse
//! takes each literal default from here (`Env::text`), in the manner of ripgrep's flag
//! definitions.
//!
//! Invariant: no other file spells a variable's default, and a variable missing here is
//! never read (`Env` only holds the names of this table).

use super::{ChildEnv, Config, Source, StoreKind};
use std::time::Duration;

/// One variable. A default in parentheses is a description (nothing set, or computed); any
/// other default is the literal value used when the variable is unset.
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
    /// How its text is read: `Config::read` reads it through this (`Env`'s typed readers),
    /// and a bad value is refused naming the variable and what would be valid.
    pub parse: Parse,
    /// Its value is a credential: `config` never shows it, and neither the `PAT_ON_ROTATE`
    /// hook nor any other child process inherits it.
    pub secret: bool,
    /// The effective value as `config` shows it: a secret as a fingerprint, never its value.
    pub(crate) show: fn(&Config) -> String,
    /// The value a child rotator gets, if its settings give one.
    pub(crate) child: fn(&ChildEnv) -> Option<String>,
}

/// What a variable's text must be. `Text` values have a reader of their own in
/// `config/mod.rs` (a URL, a path, a section name, a command line, a credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Whole seconds, 1 or more (0 too when `zero_ok`).
    Seconds {
        zero_ok: bool,
    },
    /// `true` or `false` (also 1/0, yes/no, on/off).
    Boolean,
    /// `host:port`; when `loopback_because` says why, a loopback address only.
    Address {
        loopback_because: Option<&'static str>,
    },
    /// A Kubernetes object name.
    KubeName,
    /// One of these words (any case).
    OneOf(&'static [&'static str]),
    /// A TCP port, 1 to 65535.
    Port,
    Text,
}

impl Variable {
    /// The literal default, if the default is a value rather than a description.
    pub(crate) fn literal_default(&self) -> Option<&'static str> {
        (!self.default.starts_with('(') && !self.default.starts_with('<')).then_some(self.default)
    }
}

fn secs(d: Duration) -> String {
    d.as_secs().to_string()
}

fn or_unset(v: Option<String>, unset: &str) -> String {
    v.unwrap_or_else(|| unset.into())
}

fn kube(c: &Config, pick: fn(&super::KubeTarget) -> String) -> String {
    match &c.store {
        StoreKind::Kubernetes(k) => pick(k),
        other => format!("(unused: PAT_STORE={})", other.name()),
    }
}

/// A PAT-only setting's value, or why it does not apply.
fn pat_only(c: &Config, value: String) -> String {
    if c.credential.is_pat() {
        value
    } else {
        format!("(unused: PAT_CREDENTIAL={})", c.credential.name())
    }
}

fn oauth_m2m(c: &Config, pick: fn(&str, &crate::Token) -> String) -> String {
    match &c.credential {
        super::CredentialKind::OAuthM2m {
            client_id,
            client_secret,
        } => pick(client_id, client_secret),
        other => format!("(unused: PAT_CREDENTIAL={})", other.name()),
    }
}

fn not_for_children(_: &ChildEnv) -> Option<String> {
    None
}

/// The table, in DESIGN's order.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "DATABRICKS_HOST",
        default: "(none)",
        meaning: "workspace URL, http(s)://host[:port] (a missing scheme means https); required for run, once and status --verify; set checks a token against it, or against the profile's own host",
        parse: Parse::Text,
        secret: false,
        show: |c| or_unset(c.host.clone(), "(unset)"),
        child: |e| Some(e.host.clone()),
    },
    Variable {
        name: "DATABRICKS_TOKEN",
        default: "(none)",
        meaning: "bootstrap token, used when the config file has none or its token is dead; never revoked",
        parse: Parse::Text,
        secret: true,
        show: |c| or_unset(c.bootstrap_token.as_ref().map(|t| t.fingerprint()), "(unset)"),
        child: |e| e.bootstrap.as_ref().map(|t| t.expose().to_string()),
    },
    Variable {
        name: "DATABRICKS_CONFIG_FILE",
        default: "~/.databrickscfg",
        meaning: "the config file that readers use",
        parse: Parse::Text,
        secret: false,
        show: |c| c.config_file.display().to_string(),
        child: |e| Some(e.config_file.display().to_string()),
    },
    Variable {
        name: "DATABRICKS_CONFIG_PROFILE",
        default: "DEFAULT",
        meaning: "the profile whose token is rotated",
        parse: Parse::Text,
        secret: false,
        show: |c| c.profile.clone(),
        child: not_for_children,
    },
    Variable {
        name: "PAT_TOKEN_LIFETIME",
        default: "900",
        meaning: "seconds each minted token lives",
        parse: Parse::Seconds { zero_ok: false },
        secret: false,
        show: |c| pat_only(c, secs(c.token_lifetime)),
        child: |e| Some(secs(e.lifetime)),
    },
    Variable {
        name: "PAT_ROTATION_INTERVAL",
        default: "600",
        meaning: "seconds between rotations while sessions are active; must be below the lifetime",
        parse: Parse::Seconds { zero_ok: false },
        secret: false,
        show: |c| secs(c.rotation_interval),
        child: |e| Some(secs(e.interval)),
    },
    Variable {
        name: "PAT_REVOKE_GRACE",
        default: "30",
        meaning: "seconds the old token stays valid after the new one is on disk",
        parse: Parse::Seconds { zero_ok: true },
        secret: false,
        show: |c| pat_only(c, secs(c.revoke_grace)),
        child: |e| Some(secs(e.grace)),
    },
    Variable {
        name: "PAT_SKIP_WHEN_IDLE",
        default: "true",
        meaning: "skip interval rotations while no session is active (near-expiry rotation always happens)",
        parse: Parse::Boolean,
        secret: false,
        show: |c| c.skip_when_idle.to_string(),
        child: not_for_children,
    },
    Variable {
        name: "PAT_HTTP_TIMEOUT",
        default: "30",
        meaning: "seconds per provider request",
        parse: Parse::Seconds { zero_ok: false },
        secret: false,
        show: |c| secs(c.http_timeout),
        child: |e| Some(secs(e.http_timeout)),
    },
    Variable {
        name: "PAT_WRITE_LOCK_WAIT",
        default: "35",
        meaning: "seconds a manual write waits for the lock; must exceed PAT_HTTP_TIMEOUT",
        parse: Parse::Seconds { zero_ok: false },
        secret: false,
        show: |c| secs(c.write_lock_wait),
        // One second above the HTTP timeout, the least the parse accepts.
        child: |e| Some(secs(e.http_timeout + Duration::from_secs(1))),
    },
    Variable {
        name: "PAT_LISTEN",
        default: "0.0.0.0:9464",
        meaning: "health, readiness and metrics: /healthz, /readyz, /metrics (never a token)",
        parse: Parse::Address { loopback_because: None },
        secret: false,
        show: |c| c.listen.to_string(),
        child: |e| Some(e.listen.to_string()),
    },
    Variable {
        name: "PAT_CONTROL_LISTEN",
        default: "127.0.0.1:9465",
        meaning: "session leases and the SDK metadata-service token endpoint; must be a loopback address (it hands out tokens)",
        parse: Parse::Address {
            loopback_because: Some("it hands out tokens"),
        },
        secret: false,
        show: |c| c.control_listen.to_string(),
        child: |e| Some(e.control_listen.to_string()),
    },
    Variable {
        name: "PAT_SESSION_TTL",
        default: "120",
        meaning: "seconds a session lease lives without a heartbeat",
        parse: Parse::Seconds { zero_ok: false },
        secret: false,
        show: |c| secs(c.session_ttl),
        child: |e| e.session_ttl.map(secs),
    },
    Variable {
        name: "PAT_TOKEN_COMMENT",
        default: "pat-rotator",
        meaning: "comment prefix on minted tokens: <prefix>:<instance>",
        parse: Parse::Text,
        secret: false,
        show: |c| c.token_comment.clone(),
        child: |e| e.token_comment.clone(),
    },
    Variable {
        name: "PAT_INSTANCE",
        default: "<host name>-<8 hex of SHA-256(config path, profile)>",
        meaning: "this rotator's identity in token comments; it reaps and revokes only tokens carrying it, so rotators of other files or profiles on one host never touch each other's (in a pod, set it to the pod name)",
        parse: Parse::Text,
        secret: false,
        show: |c| c.instance.clone(),
        child: |e| Some(e.instance.clone()),
    },
    Variable {
        name: "PAT_LOG_FORMAT",
        default: "text",
        meaning: "text or json; RUST_LOG filters",
        parse: Parse::OneOf(&["text", "json"]),
        secret: false,
        show: |c| format!("{:?}", c.log_format).to_lowercase(),
        // The soak and the tests read the children's logs as JSON.
        child: |_| Some("json".into()),
    },
    Variable {
        name: "PAT_ON_ROTATE",
        default: "(none)",
        meaning: "command (argv split, no shell) run after each new token is on disk, with PAT_TOKEN_FINGERPRINT, PAT_TOKEN_ID, PAT_TOKEN_EXPIRES_AT (its fingerprint, id and expiry) in its environment, never the token",
        parse: Parse::Text,
        secret: false,
        show: |c| or_unset(c.on_rotate.as_ref().map(shell_words::join), "(unset)"),
        child: not_for_children,
    },
    Variable {
        name: "PAT_PROXY_LISTEN",
        default: "(off)",
        meaning: "loopback address of the authenticating proxy: http://ADDR/<secret>/<path> is forwarded to DATABRICKS_HOST/<path> with the current token",
        parse: Parse::Address {
            loopback_because: Some("it authenticates whatever reaches it"),
        },
        secret: false,
        show: |c| or_unset(c.proxy_listen.map(|a| a.to_string()), "(off)"),
        child: |e| e.proxy_listen.map(|a| a.to_string()),
    },
    Variable {
        name: "PAT_STORE",
        default: "file",
        meaning: "where the credential lives: file (the config file), or kubernetes (a Secret shared by every replica, mirrored into each one's config file; a Lease elects the one that rotates; see \"Several replicas on Kubernetes\")",
        parse: Parse::OneOf(&["file", "kubernetes"]),
        secret: false,
        show: |c| c.store.name().into(),
        child: not_for_children,
    },
    Variable {
        name: "PAT_KUBE_SECRET",
        default: "databricks-pat",
        meaning: "cluster store: the Secret that holds the current token (keys token and state)",
        parse: Parse::KubeName,
        secret: false,
        show: |c| kube(c, |k| k.secret.clone()),
        child: not_for_children,
    },
    Variable {
        name: "PAT_KUBE_NAMESPACE",
        default: "(the pod's, or the kubeconfig context's)",
        meaning: "cluster store: namespace of the Secret and the Lease",
        parse: Parse::KubeName,
        secret: false,
        show: |c| {
            kube(c, |k| {
                or_unset(k.namespace.clone(), "(the pod's, or the kubeconfig context's)")
            })
        },
        child: not_for_children,
    },
    Variable {
        name: "PAT_KUBE_LEASE",
        default: "<PAT_KUBE_SECRET>-rotation",
        meaning: "cluster store: the coordination.k8s.io/v1 Lease that elects the replica that rotates",
        parse: Parse::KubeName,
        secret: false,
        show: |c| kube(c, |k| k.lease.clone()),
        child: not_for_children,
    },
    Variable {
        name: "PAT_REVOKE_SEED",
        default: "false",
        meaning: "revoke a seed token (one no pat-rotator minted) once it has been replaced and the grace has passed",
        parse: Parse::Boolean,
        secret: false,
        show: |c| c.revoke_seed.to_string(),
        child: not_for_children,
    },
    Variable {
        name: "PAT_CONTROL_SECRET",
        default: "(random at each start)",
        meaning: "the capability in the URLs that hand out tokens (32+ URL-safe characters: A-Z a-z 0-9 - _ . ~); the URLs are in <config>.control.json and status --json; set it (from a Kubernetes Secret) when the URL must be known in advance",
        parse: Parse::Text,
        secret: true,
        show: |c| match c.source_of("PAT_CONTROL_SECRET") {
            Source::Environment => "(set; never shown)".into(),
            Source::Default => "(random at each start)".into(),
        },
        child: |e| e.control_secret.as_ref().map(|s| s.expose().to_string()),
    },
    Variable {
        name: "PAT_CREDENTIAL",
        default: "pat",
        meaning: "what kind of credential is kept: pat (a personal access token), oauth-m2m (an OAuth access token from DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET), or oauth-u2m (an OAuth access token from pat-rotator login, refreshed once per machine with single-use refresh tokens); readers see a token in the profile either way (see \"OAuth credentials\")",
        parse: Parse::OneOf(&["pat", "oauth-m2m", "oauth-u2m"]),
        secret: false,
        show: |c| c.credential.name().into(),
        child: |e| e.oauth.as_ref().map(|o| o.name().to_string()),
    },
    Variable {
        name: "DATABRICKS_CLIENT_ID",
        default: "(none)",
        meaning: "oauth-m2m: the service principal's OAuth client id",
        parse: Parse::Text,
        secret: false,
        show: |c| oauth_m2m(c, |id, _| id.to_string()),
        child: |e| Some(e.oauth.as_ref()?.client()?.0.to_string()),
    },
    Variable {
        name: "DATABRICKS_CLIENT_SECRET",
        default: "(none)",
        meaning: "oauth-m2m: the service principal's OAuth secret",
        parse: Parse::Text,
        secret: true,
        show: |c| oauth_m2m(c, |_, secret| secret.fingerprint()),
        child: |e| Some(e.oauth.as_ref()?.client()?.1.expose().to_string()),
    },
    Variable {
        name: "PAT_LOGIN_PORT",
        default: "8020",
        meaning: "oauth-u2m: the loopback port pat-rotator login receives the browser's redirect on (http://localhost:<port>)",
        parse: Parse::Port,
        secret: false,
        show: |c| c.login_port.to_string(),
        child: not_for_children,
    },
];

/// The names of the secret variables: what no child process inherits.
pub fn secret_names() -> impl Iterator<Item = &'static str> {
    VARIABLES.iter().filter(|v| v.secret).map(|v| v.name)
}

/// The table's row for `name`; the names are this module's, so a miss is a typo in the
/// caller (caught by every test that reads a configuration).
pub(crate) fn variable(name: &str) -> &'static Variable {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{name} is not in config::VARIABLES"))
}
