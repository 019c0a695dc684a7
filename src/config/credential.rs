//! `PAT_CREDENTIAL`: which kind of credential the rotator keeps, with the variables each
//! kind needs (`DATABRICKS_CLIENT_ID`, `DATABRICKS_CLIENT_SECRET`, `PAT_LOGIN_PORT`), and a
//! warning for each PAT-only setting that does not apply to an OAuth one.

use super::{ConfigError, Env};
use crate::secret::Token;

/// Which kind of credential the rotator keeps (`PAT_CREDENTIAL`): readers see a bearer
/// token in the profile's `token` whichever it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// A personal access token, minted with a live one.
    Pat,
    /// An OAuth access token from a service principal's client secret.
    OAuthM2m {
        client_id: String,
        client_secret: Token,
    },
    /// An OAuth access token from a user's login, refreshed with single-use refresh tokens
    /// kept in the state (`pat-rotator login` stores the first).
    OAuthU2m,
}

impl CredentialKind {
    /// The `PAT_CREDENTIAL` value that names it.
    pub fn name(&self) -> &'static str {
        match self {
            CredentialKind::Pat => "pat",
            CredentialKind::OAuthM2m { .. } => "oauth-m2m",
            CredentialKind::OAuthU2m => "oauth-u2m",
        }
    }

    pub fn is_pat(&self) -> bool {
        matches!(self, CredentialKind::Pat)
    }
}

pub(super) fn credential(
    env: &Env,
    warnings: &mut Vec<String>,
) -> Result<CredentialKind, ConfigError> {
    let kind = match env.choice("PAT_CREDENTIAL")? {
        Some("oauth-m2m") => {
            let required = |var: &'static str, reason: &'static str| {
                env.set(var).ok_or(ConfigError::Missing { var, reason })
            };
            CredentialKind::OAuthM2m {
                client_id: required("DATABRICKS_CLIENT_ID", "PAT_CREDENTIAL=oauth-m2m needs the service principal's OAuth client id (its application id)")?.to_string(),
                client_secret: Token::new(required("DATABRICKS_CLIENT_SECRET", "PAT_CREDENTIAL=oauth-m2m needs the service principal's OAuth secret (Settings > Identity and access > Service principals > Secrets)")?),
            }
        }
        Some("oauth-u2m") => CredentialKind::OAuthU2m,
        _ => return Ok(CredentialKind::Pat),
    };
    for (var, why) in [
        (
            "PAT_TOKEN_LIFETIME",
            "the workspace chooses an access token's lifetime (expires_in)",
        ),
        (
            "PAT_REVOKE_GRACE",
            "an OAuth access token is never revoked; it lives out its lifetime",
        ),
        (
            "DATABRICKS_TOKEN",
            "OAuth mints with its own grant, never with a token",
        ),
        ("PAT_REVOKE_SEED", "there is no seed token to revoke"),
    ] {
        if env.set(var).is_some() {
            warnings.push(format!(
                "{var} does not apply to PAT_CREDENTIAL={}: {why}",
                kind.name()
            ));
        }
    }
    Ok(kind)
}
