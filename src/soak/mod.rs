//! `pat-rotator soak`: the compressed-cycle soak.
//!
//! Runs real rotator and reader processes (this binary) against the embedded emulator:
//! idle and busy phases, provider faults, `kill -9` of rotators, and a verdict. Invariant:
//! the verdict is derived only from what the emulator and the readers observed (requests
//! with dead tokens, 403s, tokens near expiry on disk, gaps without a rotation, leaked
//! tokens), never from the rotators' own claims.
//!
//! With `--store kubernetes` the rotators are replicas of the cluster store, each with its
//! own config file, sharing a Secret and a Lease on the API server `KUBECONFIG` names; the
//! soak kills the lease holder and cuts the replicas off the API server.

mod cluster;
mod drive;
pub(crate) mod oauth;
pub(crate) mod reader_proc;
pub mod report;
mod setup;
mod timeline;
mod verdict;

#[cfg(test)]
pub(crate) use drive::ForeignLock;
use report::Report;
use std::path::PathBuf;
use std::time::Duration;

/// Comment prefix of the soak's rotators (`<prefix>:soak-<n>`).
pub(crate) const SOAK_COMMENT: &str = "pat-rotator-soak";
/// `PAT_HTTP_TIMEOUT` of the soak's rotators.
const HTTP_TIMEOUT: u64 = 3;
/// How often each reader makes its authenticated call.
const READER_POLL_MS: u64 = 100;

#[derive(Debug, Clone)]
pub(crate) struct SoakOptions {
    pub duration: Duration,
    pub lifetime: u64,
    pub interval: u64,
    pub grace: u64,
    pub readers: usize,
    pub rotators: usize,
    pub faults: bool,
    /// Seconds between `kill -9`s of a rotator; 0 = never.
    pub kill_every: u64,
    /// Seconds per idle or busy phase.
    pub phase: u64,
    pub out: Option<PathBuf>,
    /// Soak a real workspace instead of the emulator (token from DATABRICKS_TOKEN).
    pub host: Option<String>,
    /// Deliberately broken readers: a time-only cache of this many seconds.
    pub reader_cache: Option<u64>,
    /// Replicas of the cluster store (`PAT_STORE=kubernetes`) instead of rotators sharing a
    /// file.
    pub kubernetes: bool,
    /// The credential the rotators keep (the neighbour keeps a PAT).
    pub credential: oauth::SoakCredential,
}

impl SoakOptions {
    /// The settings in one line: printed at the start, at the top of `summary.txt` and on
    /// the picture.
    pub fn describe(&self) -> String {
        format!(
            "{} s, {} store, lifetime {} s, interval {} s, grace {} s, {} {}, {} readers, faults {}, kill -9 every {} s{}",
            self.duration.as_secs(),
            if self.kubernetes { "kubernetes" } else { "file" },
            self.lifetime,
            self.interval,
            self.grace,
            self.rotators,
            if self.kubernetes { "replicas" } else { "rotators" },
            self.readers,
            if self.faults { "on" } else { "off" },
            self.kill_every,
            match self.credential {
                oauth::SoakCredential::Pat => String::new(),
                other => format!(", credential {}", other.name()),
            }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SoakError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot write the report in {path}: {source}")]
    Report {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs the soak: set up the emulator, rotators and readers; drive the phases, faults and
/// kills; stop everything and judge from what the emulator and the readers saw.
pub async fn run(opts: SoakOptions) -> Result<(Report, PathBuf), SoakError> {
    let mut rig = setup::start(&opts).await?;
    let observed = drive::drive(&opts, &mut rig).await?;
    let report = verdict::judge(&opts, &mut rig, observed).await;
    let out = rig.out.clone();
    let json = serde_json::to_vec_pretty(&report).map_err(|e| SoakError::Report {
        path: out.clone(),
        source: std::io::Error::other(e),
    })?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes).map_err(|e| SoakError::Report {
            path: out.join(name),
            source: e,
        })
    };
    write("report.json", &json)?;
    write("timeline.svg", report.svg().as_bytes())?;
    write(
        "summary.txt",
        format!("soak: {}\n{}", report.settings_line, report.summary()).as_bytes(),
    )?;
    if let Some(emu) = rig.emulator.take() {
        emu.stop().await;
    }
    if let Some(cluster) = &rig.cluster {
        cluster.cleanup().await;
    }
    Ok((report, out))
}

/// How close to expiry the token on disk may come: half the threshold, at most 30 s (with the
/// default 60 s threshold, Azure Databricks' 30 s rejection window).
///
/// Replicas of the cluster store: a lease holder killed as the forced window opens is
/// replaced within the lease duration plus one renewal period. At the default threshold
/// (60 s, lease 15 s) that leaves 40 s, Azure's 30 s plus a sixth of the threshold to spare;
/// below a 30 s threshold the lease is half the threshold and the 30/60 ratio cannot hold, so
/// compressed settings keep the same spare instead.
fn near_expiry_margin(opts: &SoakOptions) -> Duration {
    let threshold = crate::policy::threshold(Duration::from_secs(opts.interval));
    let azure = (threshold / 2).min(Duration::from_secs(30));
    if !opts.kubernetes {
        return azure;
    }
    let lease = crate::cluster::lease_duration_for_threshold(threshold);
    let takeover = lease + lease / 3;
    azure
        .min(threshold.saturating_sub(takeover + threshold / 6))
        .max(Duration::from_secs(1))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
