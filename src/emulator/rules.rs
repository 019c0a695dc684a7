//! A workspace's rules about tokens: the per-user quota, an admin's maximum token lifetime,
//! and the token permission, each with the status and body a workspace answers, and
//! changeable at run time (`POST /emulator/rules`). Taking the permission away revokes every
//! token of the user at once, as a workspace does.

use super::{error, Emulator, TOKEN_QUOTA};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A workspace's rules about tokens, changeable at run time (`POST /emulator/rules`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rules {
    /// Live tokens per user: a create past it answers `QUOTA_EXCEEDED`.
    #[serde(default = "default_quota")]
    pub token_quota: usize,
    /// The admin's `maxTokenLifetimeDays`, in seconds: a create asking for longer (or for no
    /// expiry) answers 400 `INVALID_PARAMETER_VALUE`.
    #[serde(default)]
    pub max_lifetime_s: Option<u64>,
    /// The user may use tokens. Taking it away revokes every token of the user at once, and
    /// creates answer 403 `PERMISSION_DENIED`.
    #[serde(default = "default_permitted")]
    pub tokens_permitted: bool,
}

fn default_quota() -> usize {
    TOKEN_QUOTA
}

fn default_permitted() -> bool {
    true
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            token_quota: TOKEN_QUOTA,
            max_lifetime_s: None,
            tokens_permitted: true,
        }
    }
}

impl Emulator {
    pub fn rules(&self) -> Rules {
        self.lock().rules.clone()
    }

    /// Changes the workspace's rules; taking the token permission away revokes every PAT of
    /// the user at once, as a workspace does.
    pub fn set_rules(&self, rules: Rules) {
        let now = self.now();
        let mut inner = self.lock();
        if !rules.tokens_permitted {
            for t in inner
                .tokens
                .values_mut()
                .filter(|t| !t.oauth && t.is_live(now))
            {
                t.revoked_at = Some(now);
            }
        }
        inner.rules = rules;
    }

    /// A create the workspace's rules refuse: the token permission taken away, or a
    /// lifetime past the admin's maximum (no expiry counts as past it).
    pub(super) fn refused_by_rules(&self, lifetime_seconds: Option<i64>) -> Option<Response> {
        let rules = self.rules();
        if !rules.tokens_permitted {
            return Some(error(
                StatusCode::FORBIDDEN,
                json!("PERMISSION_DENIED"),
                "User does not have permission to use tokens.",
            ));
        }
        let max = rules.max_lifetime_s?;
        let asked = lifetime_seconds.filter(|s| *s > 0);
        if asked.is_some_and(|s| s as u64 <= max) {
            return None;
        }
        let cap = if max % 86_400 == 0 {
            format!("{} days", max / 86_400)
        } else {
            format!("{max} seconds")
        };
        Some(error(
            StatusCode::BAD_REQUEST,
            json!("INVALID_PARAMETER_VALUE"),
            &format!(
                "Token lifetime cannot exceed {cap} (maxTokenLifetimeDays of this workspace)."
            ),
        ))
    }
}
