//! `pat-rotator token`: the current token for scripts, only when it is live by our record.

use super::{exit, CliError};
use crate::config::Config;
use crate::service::Shared;
use chrono::Utc;

pub(super) fn execute(cfg: Config) -> Result<i32, CliError> {
    token(cfg).map(|_| exit::OK)
}

/// `pat-rotator token`: prints the current token for scripts.
fn token(cfg: Config) -> Result<(), CliError> {
    let shared = Shared::new(cfg)?;
    let now = Utc::now();
    // Token and expiry from one snapshot: a rotation in between cannot pair them wrongly.
    let snap = shared.store.read()?;
    match shared.servable(&snap, now) {
        Ok(servable) => {
            println!("{}", servable.token.expose());
            Ok(())
        }
        Err(why) => Err(CliError::new(
            exit::FAILURE,
            format!(
                "no usable token for profile [{}] in {}: {why}; check the rotator (`pat-rotator status`)",
                shared.config.profile,
                shared.config.config_file.display()
            ),
        )),
    }
}
