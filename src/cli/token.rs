//! `pat-rotator token`: the current token for scripts, only when it is live by our record.

use super::{exit, CliError};
use crate::config::Config;
use crate::shared::Shared;
use chrono::Utc;

pub(super) fn execute(cfg: Config) -> Result<i32, CliError> {
    token(cfg).map(|_| exit::OK)
}

/// `pat-rotator token`: prints the current token for scripts.
fn token(cfg: Config) -> Result<(), CliError> {
    // Checked before anything is opened: reading takes the lock, which creates its file.
    let file = cfg.config_file.clone();
    let missing = match file.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.exists() => {
            Some(format!("its directory {} does not exist", dir.display()))
        }
        _ if !file.exists() => Some("the file does not exist".to_string()),
        _ => None,
    };
    if let Some(what) = missing {
        return Err(CliError::new(
            exit::FAILURE,
            format!(
                "no token: {} is DATABRICKS_CONFIG_FILE and {what}; set DATABRICKS_CONFIG_FILE to the file the rotator writes, or start `pat-rotator run`",
                file.display()
            ),
        ));
    }
    let shared = Shared::new(cfg)?;
    let now = Utc::now();
    // Token and expiry from one snapshot: a rotation in between cannot pair them wrongly.
    let snap = shared.store.read()?;
    match shared.servable(&snap, now) {
        Ok(token) => {
            println!("{}", token.expose());
            Ok(())
        }
        Err(why) => Err(CliError::new(
            exit::FAILURE,
            format!(
                "no usable token for profile [{}] in {}: {why}; check the rotator (`pat-rotator status`)",
                shared.config.profile,
                file.display()
            ),
        )),
    }
}
