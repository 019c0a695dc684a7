//! pat-rotator keeps a Databricks personal access token alive for the programs that use it.
//!
//! Modules by responsibility: [`config`] (validated environment), [`policy`] (pure rotation
//! decisions), [`ini`] and [`store`] (the config file, its locks and the state file),
//! [`reader`] (the always-fresh token reader), [`provider`] (the token API client),
//! [`emulator`] (a Databricks-compatible token API for tests and the soak), [`rotator`]
//! (the loop), [`sessions`], [`metrics`] and [`server`] (the service surface),
//! [`commands`] (what each CLI command does) and [`soak`].

pub mod backoff;
pub mod cli;
pub mod config;
pub mod emulator;
pub(crate) mod hook;
pub mod ini;
pub mod local_surface;
pub mod metrics;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod reader;
pub mod rotator;
pub mod secret;
pub mod server;
pub mod service;
pub mod sessions;
pub mod soak;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod watch;

pub use secret::Token;
