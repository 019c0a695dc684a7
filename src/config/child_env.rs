//! The environment of a rotator started by another program (the soak, the integration
//! tests): settings as typed fields, turned into variables in one place, so no caller spells
//! the variable names again.

use crate::secret::{ControlSecret, Token};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A rotator's settings in compressed time, as the soak and the tests start one. The
/// bootstrap token and the control secret keep their redacting types until [`ChildEnv::vars`].
#[derive(Debug, Clone)]
pub struct ChildEnv {
    pub host: String,
    pub bootstrap: Option<Token>,
    pub config_file: PathBuf,
    pub lifetime: Duration,
    pub interval: Duration,
    pub grace: Duration,
    pub http_timeout: Duration,
    pub listen: SocketAddr,
    pub control_listen: SocketAddr,
    pub proxy_listen: Option<SocketAddr>,
    pub control_secret: Option<ControlSecret>,
    pub session_ttl: Option<Duration>,
    pub token_comment: Option<String>,
    pub instance: String,
    /// The credential kept, `None` for a PAT.
    pub oauth: Option<ChildOAuth>,
}

/// An OAuth child's credential (`PAT_CREDENTIAL`).
#[derive(Debug, Clone)]
pub enum ChildOAuth {
    M2m {
        client_id: String,
        client_secret: Token,
    },
    U2m,
}

impl ChildOAuth {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            ChildOAuth::M2m { .. } => "oauth-m2m",
            ChildOAuth::U2m => "oauth-u2m",
        }
    }

    pub(crate) fn client(&self) -> Option<(&str, &Token)> {
        match self {
            ChildOAuth::M2m {
                client_id,
                client_secret,
            } => Some((client_id, client_secret)),
            ChildOAuth::U2m => None,
        }
    }
}

impl ChildEnv {
    /// The variables the table gives a child (`Variable::child`: `PAT_WRITE_LOCK_WAIT` one
    /// second above the HTTP timeout, JSON logs), and `RUST_LOG` at info (the soak reads
    /// the logs).
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = super::VARIABLES
            .iter()
            .filter_map(|v| Some((v.name.to_string(), (v.child)(self)?)))
            .collect();
        vars.push(("RUST_LOG".into(), "info".into()));
        vars
    }
}

#[cfg(test)]
mod tests {
    const SECRET: &str = "Vb8Nq3Xe6Rt1Ym9Kp4Lz7Hc2Ws5Dg0Ja";
    use super::*;

    #[test]
    fn every_variable_it_sets_is_one_the_configuration_reads_and_accepts() {
        let env = ChildEnv {
            host: "http://127.0.0.1:1".into(),
            bootstrap: Some(Token::new("boot-secret-value")),
            config_file: "/tmp/cfg".into(),
            lifetime: Duration::from_secs(8),
            interval: Duration::from_secs(4),
            grace: Duration::from_secs(2),
            http_timeout: Duration::from_secs(2),
            listen: "127.0.0.1:1".parse().unwrap(),
            control_listen: "127.0.0.1:2".parse().unwrap(),
            proxy_listen: Some("127.0.0.1:3".parse().unwrap()),
            control_secret: Some(ControlSecret::parse(SECRET).unwrap()),
            session_ttl: Some(Duration::from_secs(30)),
            token_comment: Some("c".into()),
            instance: "i".into(),
            oauth: Some(ChildOAuth::M2m {
                client_id: "sp".into(),
                client_secret: Token::new("client-secret-value"),
            }),
        };
        let shown = format!("{env:?}");
        assert!(
            !shown.contains("boot-secret-value")
                && !shown.contains(SECRET)
                && !shown.contains("client-secret-value")
        );
        let vars = env.vars();
        for (k, _) in &vars {
            assert!(
                k == "RUST_LOG" || super::super::VARIABLES.iter().any(|v| v.name == k),
                "{k} is not in the variable table"
            );
        }
        let cfg = super::super::Config::from_vars(vars).unwrap();
        assert_eq!(cfg.token_lifetime, Duration::from_secs(8));
        assert_eq!(cfg.write_lock_wait, Duration::from_secs(3));
        assert!(cfg.proxy_listen.is_some());
        assert_eq!(cfg.credential.name(), "oauth-m2m");
    }
}
