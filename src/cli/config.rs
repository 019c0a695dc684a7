//! `pat-rotator config`: the effective configuration and where each value came from.

use super::CliError;
use crate::config::{Config, ConfigError, Source};

pub(super) fn execute(result: Result<Config, ConfigError>) -> i32 {
    config(result)
}

/// `pat-rotator config`: the effective configuration; exit 78 when invalid.
fn config(result: Result<Config, ConfigError>) -> i32 {
    match result {
        Ok(cfg) => {
            for (name, value, source) in cfg.describe() {
                let from = match source {
                    Source::Environment => "environment",
                    Source::Default => "default",
                };
                println!("{name:<27} {value:<40} ({from})");
            }
            println!(
                "{:<27} {}s (min(PAT_ROTATION_INTERVAL, 60s))",
                "threshold",
                cfg.threshold().as_secs()
            );
            println!(
                "{:<27} http://{}/<PAT_CONTROL_SECRET>{} (the full URL is in {}.control.json while `run` runs)",
                "metadata service URL",
                cfg.control_listen,
                crate::server::METADATA_PATH,
                cfg.config_file.display()
            );
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            0
        }
        Err(e) => {
            // The whole table as the environment has it, the bad row marked: one error
            // alone says nothing of the rest, and a hint back to `config` would loop.
            let bad = match &e {
                ConfigError::Invalid { var, .. } | ConfigError::Missing { var, .. } => Some(*var),
                ConfigError::Environment(_) => None,
            };
            for v in crate::config::VARIABLES {
                let value = match std::env::var(v.name) {
                    // A credential: whether it is set, never what.
                    Ok(_) if v.secret => "(set; never shown)".to_string(),
                    Ok(value) => format!("{value:?}"),
                    Err(_) => format!("{} (default)", v.default),
                };
                let mark = if bad == Some(v.name) {
                    "  <-- invalid"
                } else {
                    ""
                };
                println!("{:<27} {value:<40}{mark}", v.name);
            }
            let e: CliError = e.into();
            eprintln!("error: {e}");
            e.code
        }
    }
}
