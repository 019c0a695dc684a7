//! pat-rotator keeps a Databricks personal access token alive for the programs that use it.
//!
//! `ARCHITECTURE.md` is the map. The public modules are what a Rust program embeds (the
//! [`reader`], the [`config`], the [`Token`] type) and what the integration tests and
//! benchmarks drive; the rest is internal to the service.

/// Exponential backoff with jitter, for provider retries.
pub mod backoff;
/// The command line: one file per command, exit statuses, logging set-up.
pub mod cli;
/// The cluster store: a Kubernetes Secret and Lease shared by replicas.
pub mod cluster;
/// The validated configuration, read once from the environment.
pub mod config;
/// An embedded Databricks-compatible workspace for tests, the soak and trying things by hand.
pub mod emulator;
/// Reading and editing the Databricks config file exactly as the Python SDK reads it.
pub mod ini;
/// How every HTTP listener accepts connections: caps, timeouts, the descriptor budget.
pub mod listener;
/// The provider seam (who mints the credential) and the Databricks PAT client behind it.
pub mod provider;
/// The authenticating proxy (`PAT_PROXY_LISTEN`).
pub mod proxy;
/// The always-fresh token reader: one `stat` per call, never a timed cache.
pub mod reader;
/// The types that hold secrets and print only fingerprints.
pub mod secret;
/// The HTTP listeners: health, readiness, metrics, sessions and the SDK token endpoint.
pub mod server;
/// Session leases: how workloads say they are active.
pub mod sessions;
/// Service state shared by the loop, the listeners and the commands.
pub mod shared;
/// The credential store: the config file, its locks and the state file.
pub mod store;

pub(crate) mod boot_clock;
pub(crate) mod freeze;
pub(crate) mod hook;
pub(crate) mod knowledge;
pub(crate) mod local_surface;
pub(crate) mod metrics;
pub(crate) mod policy;
pub(crate) mod rotator;
#[cfg(test)]
pub(crate) mod sim;
pub(crate) mod soak;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod watch;

pub use secret::Token;
