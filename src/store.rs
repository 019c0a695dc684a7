//! The credential store: the config file, its lock files and the state file.
//!
//! Invariants:
//! - the config file is only ever replaced whole (temp file, fsync, rename, fsync of the
//!   directory), so a crash at any instant leaves the old or the new complete file;
//! - writers hold `<config>.lock` exclusive only for read-compare-write-rename, readers take
//!   it shared, and nobody holds it across a network call;
//! - a writer never overwrites a token other than the one it started from (compare before
//!   swap);
//! - `<config>.pat-rotator.json` describes the token whose SHA-256 it records and nothing
//!   else: a mismatch means "expiry unknown".
//!
//! Symlinks: when the config path is a symlink, the link is resolved once and the target is
//! replaced (the link itself is kept), and the lock and state files live beside the target,
//! so every process that reaches the same file through any link shares one lock.

use crate::ini::{self, IniError};
use crate::policy::TokenTimes;
use crate::secret::{fingerprint_of_sha256, Token};
use chrono::{DateTime, Utc};
use fd_lock::RwLock;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("credential busy: {path} stayed locked for {waited:?}; another writer holds it, try again (or raise PAT_WRITE_LOCK_WAIT)")]
    Busy { path: PathBuf, waited: Duration },
    #[error("{path} is not a valid Databricks config file: {source}; fix that line by hand (or, if it is not a Databricks config file at all, point DATABRICKS_CONFIG_FILE elsewhere); nothing was written")]
    Parse { path: PathBuf, source: IniError },
    #[error(
        "state file {path} is unreadable ({message}); it will be rewritten at the next rotation"
    )]
    State { path: PathBuf, message: String },
    #[error("cannot rename onto {path}: device or resource busy. It is probably a single-file (subPath) mount; mount its directory instead so the file can be replaced atomically")]
    RenameBusy { path: PathBuf },
    #[error("{path} is a symlink to a missing file ({target}); create the target or point DATABRICKS_CONFIG_FILE at a real path")]
    DanglingSymlink { path: PathBuf, target: PathBuf },
    #[error("refusing to write an empty token")]
    EmptyToken,
    #[error("{path} is larger than {} bytes, far beyond any Databricks config file; check that DATABRICKS_CONFIG_FILE names the right file", MAX_CONFIG_BYTES)]
    TooLarge { path: PathBuf },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The four files the protocol uses, derived from the config path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config: PathBuf,
    pub lock: PathBuf,
    pub rotate_lock: PathBuf,
    pub state: PathBuf,
    /// `<config>.control.json`: the capability URLs of the running service (0600).
    pub control: PathBuf,
}

impl Paths {
    pub fn for_config(path: &Path) -> Result<Paths, StoreError> {
        let config = resolve_symlink(path)?;
        let with_suffix = |suffix: &str| {
            let mut s = config.clone().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        Ok(Paths {
            lock: with_suffix(".lock"),
            rotate_lock: with_suffix(".rotate.lock"),
            state: with_suffix(".pat-rotator.json"),
            control: with_suffix(".control.json"),
            config,
        })
    }
}

fn resolve_symlink(path: &Path) -> Result<PathBuf, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => match fs::canonicalize(path) {
            Ok(target) => Ok(target),
            Err(_) => {
                let target = fs::read_link(path).map_err(io_err("read symlink", path))?;
                Err(StoreError::DanglingSymlink {
                    path: path.to_path_buf(),
                    target,
                })
            }
        },
        _ => Ok(path.to_path_buf()),
    }
}

/// What identifies one version of a file (device, inode, size, mtime and ctime with
/// nanoseconds): the one "has it changed" key of the reader cache, the service's snapshot
/// cache and the directory watch. A replacement within one mtime tick is still seen, because
/// a rename always brings a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    pub fn of(m: &fs::Metadata) -> FileVersion {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The version now; `None` when the file is absent or cannot be examined.
    pub fn current(path: &Path) -> Option<FileVersion> {
        FileVersion::of_path(path).ok().flatten()
    }

    /// `Ok(None)` when the file does not exist.
    pub fn of_path(path: &Path) -> io::Result<Option<FileVersion>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(FileVersion::of(&m))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A token awaiting revocation after the grace period.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingRevocation {
    pub token_id: String,
    pub token_sha256: String,
    pub not_before: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The state file. The `token_*`, `expires_at` and `rotated_at` fields describe one token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    #[serde(default)]
    pub token_id: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub rotated_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub rotated_by: Option<String>,
    /// The rotation threshold of the rotator that recorded this token, so that `status` (run
    /// with whatever environment its caller has) judges readiness as the service does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold_secs: Option<u64>,
    /// When the provider accepted a manually set token (expiry unknown): it may be served
    /// briefly until the rotator replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pending_revocations: Vec<PendingRevocation>,
}

/// The whole state file. Its top level describes the profile named in `profile` (the
/// contract's fields stay where every reader expects them); rotators of other profiles of the
/// same config file keep theirs under `other_profiles`, so they never take each other's
/// state for "expiry unknown" and rotate in a loop.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<String>,
    #[serde(flatten)]
    top: State,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    other_profiles: std::collections::BTreeMap<String, State>,
}

impl StateFile {
    fn owns_top(&self, profile: &str) -> bool {
        self.profile.as_deref().is_none_or(|p| p == profile)
    }
}

impl State {
    /// The recorded times, if this state describes `token`.
    pub fn times_for(&self, token: Option<&Token>) -> Option<TokenTimes> {
        let token = token?;
        if self.token_sha256.as_deref() != Some(token.sha256_hex().as_str()) {
            return None;
        }
        Some(TokenTimes {
            expires_at: self.expires_at?,
            rotated_at: self.rotated_at?,
        })
    }

    /// The provider id of `token`, if this state describes it.
    pub fn token_id_for(&self, token: &Token) -> Option<&str> {
        (self.token_sha256.as_deref() == Some(token.sha256_hex().as_str()))
            .then_some(self.token_id.as_deref())
            .flatten()
    }

    /// Records `token` as current.
    pub fn record(
        &mut self,
        token: &Token,
        token_id: Option<String>,
        expires_at: DateTime<Utc>,
        rotated_at: DateTime<Utc>,
        by: &str,
    ) {
        self.token_id = token_id;
        self.token_sha256 = Some(token.sha256_hex());
        self.expires_at = Some(expires_at);
        self.rotated_at = Some(rotated_at);
        self.rotated_by = Some(by.to_string());
        self.verified_at = None;
    }

    /// The pending revocations that may be carried out now while `on_disk` is the token in
    /// the file: due, and never the token a reader can see (a state written just before a
    /// config write that then failed queues the old token while it is still on disk).
    pub fn revocable(
        &self,
        on_disk: Option<&Token>,
        now: DateTime<Utc>,
    ) -> Vec<&PendingRevocation> {
        let visible = on_disk.map(Token::sha256_hex);
        self.pending_revocations
            .iter()
            .filter(|p| p.not_before <= now && Some(&p.token_sha256) != visible.as_ref())
            .collect()
    }

    /// The token this state records as current, as a revocation to queue when it is
    /// replaced: whether or not it is still in the file (a deleted or hand-edited file loses
    /// it there, but it lives on at the provider until revoked).
    pub fn replaced_current(&self, not_before: DateTime<Utc>) -> Option<PendingRevocation> {
        Some(PendingRevocation {
            token_id: self.token_id.clone()?,
            token_sha256: self.token_sha256.clone()?,
            not_before,
            expires_at: self.expires_at,
        })
    }

    /// Queues `p`, once per token id (a later entry replaces an earlier one).
    pub fn queue_revocation(&mut self, p: PendingRevocation) {
        self.pending_revocations
            .retain(|q| q.token_id != p.token_id);
        self.pending_revocations.push(p);
    }

    /// Forgets the current token (after a manual `set`): its expiry is unknown.
    pub fn clear_current(&mut self) {
        self.token_id = None;
        self.token_sha256 = None;
        self.expires_at = None;
        self.rotated_at = None;
        self.rotated_by = None;
        self.threshold_secs = None;
        self.verified_at = None;
    }

    /// When the provider last accepted `token`, if it is a manually set token this state
    /// describes without a known expiry.
    pub fn verified_seed(&self, token: &Token) -> Option<DateTime<Utc>> {
        (self.token_sha256.as_deref() == Some(token.sha256_hex().as_str()))
            .then_some(self.verified_at)
            .flatten()
    }

    pub fn fingerprint(&self) -> Option<String> {
        self.token_sha256.as_deref().map(fingerprint_of_sha256)
    }
}

/// What a rotation records about the token it writes.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub token_id: String,
    /// On the local clock (see the rotator's `local_expiry`).
    pub expires_at: DateTime<Utc>,
    /// The instance that minted it.
    pub rotated_by: String,
    /// The rotation threshold in use, so `status` judges readiness as the service does.
    pub threshold: Option<Duration>,
    /// How long the replaced token stays valid once this one is on disk.
    pub grace: Duration,
    /// The token this one replaces, to revoke after the grace; its `not_before` is set when
    /// the new token is written.
    pub replaces: Option<PendingRevocation>,
}

impl Rotation {
    /// A rotation that records `token_id` and replaces nothing.
    pub fn new(token_id: impl Into<String>, expires_at: DateTime<Utc>, rotated_by: &str) -> Self {
        Rotation {
            token_id: token_id.into(),
            expires_at,
            rotated_by: rotated_by.to_string(),
            threshold: None,
            grace: Duration::ZERO,
            replaces: None,
        }
    }

    fn apply(&self, state: &mut State, token: &Token, written_at: DateTime<Utc>) {
        state.record(
            token,
            Some(self.token_id.clone()),
            self.expires_at,
            written_at,
            &self.rotated_by,
        );
        state.threshold_secs = self.threshold.map(|t| t.as_secs());
        if let Some(old) = &self.replaces {
            state.queue_revocation(PendingRevocation {
                not_before: revoke_not_before(written_at, self.grace),
                ..old.clone()
            });
        }
    }
}

/// The earliest instant a replaced token may be revoked: the grace after its replacement
/// reached the disk, plus one second so that no `expires_on` a reader was told (at most
/// `now + grace`, in whole seconds, with `now` taken before its read) is ever later.
pub fn revoke_not_before(written_at: DateTime<Utc>, grace: Duration) -> DateTime<Utc> {
    written_at
        + chrono::TimeDelta::from_std(grace).unwrap_or(chrono::TimeDelta::MAX / 2)
        + chrono::TimeDelta::seconds(1)
}

/// What the store saw in one locked read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub token: Option<Token>,
    pub host: Option<String>,
    pub state: State,
    /// The state file could not be parsed (treated as empty: expiry unknown).
    pub state_error: Option<String>,
}

impl Snapshot {
    pub fn times(&self) -> Option<TokenTimes> {
        self.state.times_for(self.token.as_ref())
    }

    /// A warning when the profile's own `host` names another workspace than
    /// `DATABRICKS_HOST`: tokens are minted on `DATABRICKS_HOST`, and the rotator never
    /// rewrites an existing `host`, so readers would send them to the wrong workspace.
    pub fn host_mismatch(&self, configured: Option<&str>) -> Option<String> {
        let (file_host, configured) = (self.host.as_deref()?, configured?);
        (crate::config::normalize_host(file_host) != crate::config::normalize_host(configured))
            .then(|| format!("the profile's host {file_host} differs from DATABRICKS_HOST={configured}; tokens are minted on DATABRICKS_HOST, so fix one of them"))
    }
}

#[derive(Debug)]
pub enum SwapOutcome {
    Swapped,
    /// The file holds another token than the one the write started from.
    Conflict {
        current: Option<Token>,
    },
}

/// The config file of one profile and its protocol files.
#[derive(Debug, Clone)]
pub struct Store {
    paths: Paths,
    profile: String,
    /// How long a reader waits for a writer to release the lock.
    read_wait: Duration,
}

/// Writers hold the lock for milliseconds; a reader that waits this long has found a stuck one.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(10);

impl Store {
    pub fn open(config: &Path, profile: &str) -> Result<Store, StoreError> {
        Ok(Store {
            paths: Paths::for_config(config)?,
            profile: profile.to_string(),
            read_wait: DEFAULT_READ_WAIT,
        })
    }

    /// The same store with another reader wait (a manual write waits `PAT_WRITE_LOCK_WAIT`).
    pub fn with_read_wait(mut self, wait: Duration) -> Store {
        self.read_wait = wait;
        self
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn profile(&self) -> &str {
        &self.profile
    }

    /// A warning when the config file (which holds the token) is readable by group or
    /// others: then anyone who can read it has the token, whatever the listeners check.
    pub fn permission_warning(&self) -> Option<String> {
        let mode = fs::metadata(&self.paths.config).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "{} holds the token and is readable by group or others (mode {mode:04o}); run `chmod 600 {}`",
                self.paths.config.display(),
                self.paths.config.display()
            )
        })
    }

    /// Opens a lock file read-only (`flock` needs no write access), creating it once if
    /// missing. Read-only matters: a close after writing is what the rotator's directory watch
    /// wakes for, and readers lock this file many times a second.
    fn open_lock_file(path: &Path) -> Result<File, StoreError> {
        match File::open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io_err("open lock file", path)(e))
            }
            Err(_) => {}
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode_0600()
            .open(path)
            .map_err(io_err("create lock file", path))?;
        File::open(path).map_err(io_err("open lock file", path))
    }

    /// Runs `f` holding `<config>.rotate.lock`, taken without waiting: `Ok(None)` (and `f`
    /// not run) when another rotator holds it. The lock is held across `f`'s awaits (the
    /// mint) and released when `f` ends, however it ends.
    pub async fn try_rotation<T>(
        &self,
        f: impl AsyncFnOnce() -> T,
    ) -> Result<Option<T>, StoreError> {
        let mut lock = RwLock::new(Self::open_lock_file(&self.paths.rotate_lock)?);
        let guard = match lock.try_write() {
            Ok(g) => g,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(io_err("lock", &self.paths.rotate_lock)(e)),
        };
        let out = f().await;
        drop(guard);
        Ok(Some(out))
    }

    /// Waits until no rotator holds `<config>.rotate.lock` (a winner finished), at most
    /// `limit`: `Ok(false)` when it was still held then.
    pub async fn wait_rotation_free(&self, limit: Duration) -> Result<bool, StoreError> {
        let mut lock = RwLock::new(Self::open_lock_file(&self.paths.rotate_lock)?);
        let started = Instant::now();
        loop {
            match lock.try_write() {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if started.elapsed() > limit {
                        return Ok(false);
                    }
                    tokio::time::sleep(ROTATION_POLL).await;
                }
                Err(e) => return Err(io_err("lock", &self.paths.rotate_lock)(e)),
            }
        }
    }

    /// Runs `f` holding the write lock exclusive, waiting at most `wait` for it.
    pub fn with_write_lock<T>(
        &self,
        wait: Duration,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut lock = RwLock::new(Self::open_lock_file(&self.paths.lock)?);
        let started = Instant::now();
        // fd-lock has no timeout: poll try_write inside the deadline.
        let _guard = loop {
            match lock.try_write() {
                Ok(guard) => break guard,
                Err(e) if e.kind() == ErrorKind::WouldBlock && started.elapsed() < wait => {
                    std::thread::sleep(LOCK_POLL)
                }
                Err(e) => return Err(self.lock_error(e, wait)),
            }
        };
        f()
    }

    /// Runs `f` holding the write lock shared (readers), waiting at most the read wait.
    pub fn with_read_lock<T>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let lock = RwLock::new(Self::open_lock_file(&self.paths.lock)?);
        let started = Instant::now();
        let _guard = loop {
            match lock.try_read() {
                Ok(guard) => break guard,
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock && started.elapsed() < self.read_wait =>
                {
                    std::thread::sleep(LOCK_POLL)
                }
                Err(e) => return Err(self.lock_error(e, self.read_wait)),
            }
        };
        f()
    }

    fn lock_error(&self, e: io::Error, waited: Duration) -> StoreError {
        if e.kind() == ErrorKind::WouldBlock {
            StoreError::Busy {
                path: self.paths.config.clone(),
                waited,
            }
        } else {
            io_err("lock", &self.paths.lock)(e)
        }
    }

    /// Reads the config file text; a missing file reads as empty.
    fn read_config_text(&self) -> Result<String, StoreError> {
        use std::io::Read;
        let file = match File::open(&self.paths.config) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(String::new()),
            Err(e) => return Err(io_err("read", &self.paths.config)(e)),
        };
        let mut text = String::new();
        let read = file
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io_err("read", &self.paths.config));
        match read {
            Ok(n) if n as u64 > MAX_CONFIG_BYTES => Err(StoreError::TooLarge {
                path: self.paths.config.clone(),
            }),
            Ok(_) => Ok(text),
            Err(e) => Err(e),
        }
    }

    fn parse_token(&self, text: &str) -> Result<(Option<Token>, Option<String>), StoreError> {
        let parse_err = |source| StoreError::Parse {
            path: self.paths.config.clone(),
            source,
        };
        let token = ini::get_value(text, &self.profile, "token")
            .map_err(parse_err)?
            .map(Token::new);
        let host = ini::get_value(text, &self.profile, "host").map_err(parse_err)?;
        Ok((token, host))
    }

    fn read_state_file(&self) -> (StateFile, Option<String>) {
        match fs::read(&self.paths.state) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(file) => (file, None),
                Err(e) => (StateFile::default(), Some(e.to_string())),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => (StateFile::default(), None),
            Err(e) => (StateFile::default(), Some(e.to_string())),
        }
    }

    /// This profile's part of the state file.
    fn read_state(&self) -> (State, Option<String>) {
        let (mut file, error) = self.read_state_file();
        if file.owns_top(&self.profile) {
            (file.top, error)
        } else {
            (
                file.other_profiles
                    .remove(&self.profile)
                    .unwrap_or_default(),
                error,
            )
        }
    }

    fn snapshot_unlocked(&self) -> Result<Snapshot, StoreError> {
        let text = self.read_config_text()?;
        let (token, host) = self.parse_token(&text)?;
        let (state, state_error) = self.read_state();
        Ok(Snapshot {
            token,
            host,
            state,
            state_error,
        })
    }

    /// The token, host and state, read under the shared lock.
    pub fn read(&self) -> Result<Snapshot, StoreError> {
        self.with_read_lock(|| self.snapshot_unlocked())
    }

    /// Writes this profile's part, keeping the other profiles'. Caller holds the write lock.
    fn write_state_unlocked(&self, state: &State) -> Result<(), StoreError> {
        let (mut file, _) = self.read_state_file();
        if file.owns_top(&self.profile) {
            file.profile = Some(self.profile.clone());
            file.top = state.clone();
        } else {
            file.other_profiles
                .insert(self.profile.clone(), state.clone());
        }
        let json = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::State {
            path: self.paths.state.clone(),
            message: e.to_string(),
        })?;
        atomic_write(&self.paths.state, &json)
    }

    /// Compare before swap: writes `new` only if the file still holds `expected`, recording
    /// `rotation` (when given) in the state, all under one exclusive lock. `clock` is read
    /// under the lock, just before the write: that instant is the token's `rotated_at` and
    /// starts the grace of the token it replaces.
    pub fn swap(
        &self,
        expected: Option<&Token>,
        new: &Token,
        host: Option<&str>,
        wait: Duration,
        rotation: Option<&Rotation>,
        clock: &dyn Fn() -> DateTime<Utc>,
    ) -> Result<SwapOutcome, StoreError> {
        if new.is_empty() {
            return Err(StoreError::EmptyToken);
        }
        self.with_write_lock(wait, || {
            let text = self.read_config_text()?;
            let (current, current_host) = self.parse_token(&text)?;
            if current.as_ref() != expected {
                return Ok(SwapOutcome::Conflict { current });
            }
            let (mut state, _) = self.read_state();
            if let Some(r) = rotation {
                r.apply(&mut state, new, clock());
            }
            self.commit_unlocked(&state, &text, new, host, current_host.as_deref())?;
            Ok(SwapOutcome::Swapped)
        })
    }

    /// Checks that a swap could be written now (the directory accepts a new file of the
    /// size a swap writes, the state path is not something else), so that a rotator does
    /// not mint a token it will only have to revoke. Holds no lock; creates and removes one
    /// temp file.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        for path in [&self.paths.config, &self.paths.state] {
            if let Ok(meta) = fs::symlink_metadata(path) {
                if meta.is_dir() {
                    return Err(io_err("replace", path)(io::Error::other(
                        "it is a directory, not a file; remove it",
                    )));
                }
            }
        }
        let dir = match self.paths.config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let needed = size(&self.paths.config) + size(&self.paths.state) + 4096;
        let mut probe = tempfile::Builder::new()
            .prefix(&temp_prefix(&self.paths.config))
            .tempfile_in(&dir)
            .map_err(io_err("create a file in", &dir))?;
        let zeros = vec![0u8; needed.min(MAX_CONFIG_BYTES * 2) as usize];
        probe
            .write_all(&zeros)
            .and_then(|_| probe.as_file().sync_all())
            .map_err(io_err("write a file in", &dir))?;
        Ok(())
    }

    /// Writes `state`, then the config with `new`: the order that keeps every failure safe.
    /// If the state cannot be written the config is untouched (the caller may revoke the new
    /// token: no reader has seen it). If the config write then fails, the previous state is
    /// put back when possible; if even that fails, the state describes a token that is not
    /// on disk, which reads as "expiry unknown" (rotate now), and the old token it queued is
    /// never revoked while it is on disk ([`State::revocable`]). Caller holds the write lock.
    fn commit_unlocked(
        &self,
        state: &State,
        text: &str,
        new: &Token,
        host: Option<&str>,
        current_host: Option<&str>,
    ) -> Result<(), StoreError> {
        let (previous, _) = self.read_state_file();
        self.write_state_unlocked(state)?;
        if let Err(e) = self.write_token_unlocked(text, new, host, current_host) {
            if let Ok(json) = serde_json::to_vec_pretty(&previous) {
                let _ = atomic_write(&self.paths.state, &json);
            }
            return Err(e);
        }
        Ok(())
    }

    fn write_token_unlocked(
        &self,
        text: &str,
        new: &Token,
        host: Option<&str>,
        current_host: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        if current_host.is_none() {
            if let Some(h) = host {
                pairs.push(("host", h));
            }
        }
        pairs.push(("token", new.expose()));
        let edited =
            ini::set_values(text, &self.profile, &pairs).map_err(|source| StoreError::Parse {
                path: self.paths.config.clone(),
                source,
            })?;
        remove_stale_temps(&self.paths.config);
        remove_stale_temps(&self.paths.state);
        atomic_write(&self.paths.config, edited.as_bytes())
    }

    /// Changes the state alone (pending revocations), under the exclusive lock.
    pub fn update_state<T>(
        &self,
        wait: Duration,
        f: impl FnOnce(&mut State) -> T,
    ) -> Result<T, StoreError> {
        self.with_write_lock(wait, || {
            let (mut state, _) = self.read_state();
            let out = f(&mut state);
            self.write_state_unlocked(&state)?;
            Ok(out)
        })
    }

    /// Manual seeding (`pat-rotator set`). Always fails closed when the existing file cannot
    /// be read or parsed: `force` overrides the downgrade guard, never the check that the
    /// target is a config file we may edit (replacing it would lose every other profile).
    /// `accept_current` is asked, under the lock, whether the token now in the file may be
    /// replaced (the downgrade guard lives with the caller, which knows the provider's
    /// verdict). `verified_at` records when the provider accepted the new token, so it can be
    /// served until the rotator replaces it.
    #[allow(clippy::too_many_arguments)]
    pub fn set_manual(
        &self,
        new: &Token,
        host: Option<&str>,
        force: bool,
        verified_at: Option<DateTime<Utc>>,
        wait: Duration,
        grace_until: DateTime<Utc>,
        accept_current: impl FnOnce(Option<&Token>, &State) -> Result<(), String>,
    ) -> Result<Result<(), String>, StoreError> {
        if new.is_empty() {
            return Err(StoreError::EmptyToken);
        }
        self.with_write_lock(wait, || {
            let text = self.read_config_text()?;
            let (current, current_host) = self.parse_token(&text)?;
            let (mut state, _) = self.read_state();
            if current.as_ref() == Some(new) {
                // Already there: rewriting would only forget its recorded expiry.
                return Ok(Ok(()));
            }
            if !force {
                if let Err(why) = accept_current(current.as_ref(), &state) {
                    return Ok(Err(why));
                }
            }
            // The token we minted and recorded is replaced: revoke it after the grace period.
            if let Some(p) = state.replaced_current(grace_until) {
                state.queue_revocation(p);
            }
            state.clear_current();
            if let Some(at) = verified_at {
                state.token_sha256 = Some(new.sha256_hex());
                state.verified_at = Some(at);
            }
            self.commit_unlocked(&state, &text, new, host, current_host.as_deref())?;
            Ok(Ok(()))
        })
    }
}

/// The largest config file accepted. Real ones are a few hundred bytes; a reader re-reads the
/// file after every change, so an unbounded one would cost unbounded memory per request.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// How often a rotator waiting for another's rotation looks again.
const ROTATION_POLL: Duration = Duration::from_millis(50);

/// How often a waiting reader or writer tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(5);

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp-")
}

/// Removes temp files a crashed writer left behind. Only called under the exclusive lock,
/// and only writers holding that lock create temp files, so none of these is in use.
fn remove_stale_temps(path: &Path) {
    let Some(dir) = path.parent() else { return };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = temp_prefix(path);
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Replaces `path` whole: temp file (exclusive, 0600, random name) in the same directory,
/// write, fsync, rename, fsync the directory. An existing file's mode is kept.
pub fn atomic_write(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    atomic_write_mode(path, contents, mode)
}

/// [`atomic_write`] for a file only its owner may read, whatever mode it had before.
pub fn atomic_write_private(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    atomic_write_mode(path, contents, 0o600)
}

fn atomic_write_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(&dir)
        .map_err(io_err("create a temp file in", &dir))?;
    tmp.write_all(contents)
        .map_err(io_err("write", tmp.path()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set permissions on", path))?;
    tmp.as_file().sync_all().map_err(io_err("fsync", path))?;
    tmp.persist(path).map_err(|e| {
        if e.error.raw_os_error() == Some(libc::EBUSY) {
            StoreError::RenameBusy {
                path: path.to_path_buf(),
            }
        } else {
            io_err("rename onto", path)(e.error)
        }
    })?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", &dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn store(dir: &Path) -> Store {
        Store::open(&dir.join("databrickscfg"), "DEFAULT").unwrap()
    }

    /// Writes `value` as if a rotation minted it `now` with `lifetime` seconds to live.
    fn seed_recorded(s: &Store, value: &str, now: DateTime<Utc>, lifetime: i64) {
        let t = Token::new(value);
        let r = Rotation::new(
            format!("id-{value}"),
            now + TimeDelta::seconds(lifetime),
            "me",
        );
        s.swap(None, &t, None, Duration::from_secs(1), Some(&r), &|| now)
            .unwrap();
    }

    #[test]
    fn new_file_is_0600_and_existing_mode_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let w = Duration::from_secs(1);
        assert!(matches!(
            s.swap(
                None,
                &Token::new("t1"),
                Some("https://h"),
                w,
                None,
                &Utc::now
            )
            .unwrap(),
            SwapOutcome::Swapped
        ));
        let mode = fs::metadata(&s.paths().config)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        fs::set_permissions(&s.paths().config, fs::Permissions::from_mode(0o640)).unwrap();
        s.swap(
            Some(&Token::new("t1")),
            &Token::new("t2"),
            None,
            w,
            None,
            &Utc::now,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(&s.paths().config)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o640
        );
        let text = fs::read_to_string(&s.paths().config).unwrap();
        assert_eq!(text, "[DEFAULT]\nhost = https://h\ntoken = t2\n");
    }

    #[test]
    fn swap_refuses_when_the_file_moved_on() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let w = Duration::from_secs(1);
        s.swap(None, &Token::new("a"), None, w, None, &Utc::now)
            .unwrap();
        match s
            .swap(
                Some(&Token::new("stale")),
                &Token::new("b"),
                None,
                w,
                None,
                &Utc::now,
            )
            .unwrap()
        {
            SwapOutcome::Conflict { current } => assert_eq!(current, Some(Token::new("a"))),
            other => panic!("expected conflict, got {other:?}"),
        }
        assert_eq!(s.read().unwrap().token, Some(Token::new("a")));
    }

    #[test]
    fn state_mismatch_means_unknown_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let now = Utc::now();
        seed_recorded(&s, "a", now, 60);
        let snap = s.read().unwrap();
        assert_eq!(
            snap.times().unwrap().expires_at,
            now + TimeDelta::seconds(60)
        );
        // Someone edits the file by hand: the state no longer describes it.
        fs::write(&s.paths().config, "[DEFAULT]\ntoken = b\n").unwrap();
        assert_eq!(s.read().unwrap().times(), None);
    }

    #[test]
    fn two_profiles_of_one_file_keep_separate_state() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("databrickscfg");
        let a = Store::open(&cfg, "DEFAULT").unwrap();
        let b = Store::open(&cfg, "prod").unwrap();
        let now = Utc::now();
        seed_recorded(&a, "tok-a", now, 60);
        // [prod] has no token yet: a named profile does not inherit [DEFAULT]'s (the SDK
        // reads each profile's own keys).
        let t = Token::new("tok-b");
        let r = Rotation::new("id-tok-b", now + TimeDelta::seconds(120), "me");
        b.swap(None, &t, None, Duration::from_secs(1), Some(&r), &|| now)
            .unwrap();
        let (sa, sb) = (a.read().unwrap(), b.read().unwrap());
        assert_eq!(sa.times().unwrap().expires_at, now + TimeDelta::seconds(60));
        assert_eq!(
            sb.times().unwrap().expires_at,
            now + TimeDelta::seconds(120)
        );
        // The contract's top-level fields still describe the first profile.
        let raw: serde_json::Value =
            serde_json::from_slice(&fs::read(&a.paths().state).unwrap()).unwrap();
        assert_eq!(raw["token_id"], "id-tok-a");
        assert_eq!(raw["profile"], "DEFAULT");
        assert_eq!(raw["other_profiles"]["prod"]["token_id"], "id-tok-b");
    }

    #[test]
    fn symlinked_config_keeps_the_link_and_writes_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.cfg");
        fs::write(&real, "[DEFAULT]\ntoken = a\n").unwrap();
        let link = dir.path().join("link.cfg");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let s = Store::open(&link, "DEFAULT").unwrap();
        s.swap(
            Some(&Token::new("a")),
            &Token::new("b"),
            None,
            Duration::from_secs(1),
            None,
            &Utc::now,
        )
        .unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&real).unwrap(), "[DEFAULT]\ntoken = b\n");
        let dangling = dir.path().join("dangling.cfg");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            Store::open(&dangling, "DEFAULT"),
            Err(StoreError::DanglingSymlink { .. })
        ));
    }

    #[test]
    fn stale_temp_files_are_removed_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let stale = dir.path().join(".databrickscfg.tmp-crashed");
        fs::write(&stale, "half").unwrap();
        s.swap(
            None,
            &Token::new("a"),
            None,
            Duration::from_secs(1),
            None,
            &Utc::now,
        )
        .unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn manual_set_fails_closed_on_an_unparsable_file_even_forced() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let text = "[dev]\ntoken = x\n[prod]\nhost = h\n[dev]\n";
        fs::write(&s.paths().config, text).unwrap();
        let w = Duration::from_secs(1);
        for force in [false, true] {
            let r = s.set_manual(
                &Token::new("n"),
                None,
                force,
                None,
                w,
                Utc::now(),
                |_, _| Ok(()),
            );
            assert!(matches!(r, Err(StoreError::Parse { .. })), "{r:?}");
            assert_eq!(
                fs::read_to_string(&s.paths().config).unwrap(),
                text,
                "force {force}: the other profiles must survive"
            );
        }
        assert!(matches!(
            s.set_manual(
                &Token::new(" "),
                None,
                true,
                None,
                w,
                Utc::now(),
                |_, _| Ok(())
            ),
            Err(StoreError::EmptyToken)
        ));
    }

    #[test]
    fn manual_set_queues_the_recorded_token_for_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let now = Utc::now();
        let w = Duration::from_secs(1);
        seed_recorded(&s, "a", now, 600);
        s.set_manual(&Token::new("b"), None, false, None, w, now, |cur, state| {
            assert_eq!(cur, Some(&Token::new("a")));
            assert!(state.times_for(cur).is_some());
            Ok(())
        })
        .unwrap()
        .unwrap();
        let snap = s.read().unwrap();
        assert_eq!(snap.state.pending_revocations.len(), 1);
        // Setting the token that is already there changes nothing.
        s.set_manual(&Token::new("b"), None, false, None, w, now, |_, _| {
            Err("not asked".into())
        })
        .unwrap()
        .unwrap();
        assert_eq!(s.read().unwrap().state.pending_revocations.len(), 1);
        assert_eq!(snap.state.pending_revocations[0].token_id, "id-a");
        assert_eq!(snap.times(), None);
    }

    #[test]
    fn a_state_write_that_fails_leaves_the_config_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let now = Utc::now();
        seed_recorded(&s, "old", now, 60);
        let before = fs::read(&s.paths().config).unwrap();
        // The state path replaced by a directory: the state write must fail.
        fs::remove_file(&s.paths().state).unwrap();
        fs::create_dir(&s.paths().state).unwrap();
        let new = Token::new("new");
        let r = s.swap(
            Some(&Token::new("old")),
            &new,
            None,
            Duration::from_secs(1),
            Some(&Rotation::new("id-new", now, "me")),
            &|| now,
        );
        assert!(r.is_err());
        assert_eq!(
            fs::read(&s.paths().config).unwrap(),
            before,
            "the new token reached the file though its state was never written"
        );
        assert!(
            s.check_writable().is_err(),
            "a swap is known to fail beforehand"
        );
    }

    #[test]
    fn the_token_on_disk_is_never_revocable() {
        let now = Utc::now();
        let mut st = State::default();
        let on_disk = Token::new("visible");
        for (id, token) in [("a", &on_disk), ("b", &Token::new("gone"))] {
            st.queue_revocation(PendingRevocation {
                token_id: id.into(),
                token_sha256: token.sha256_hex(),
                not_before: now - TimeDelta::seconds(1),
                expires_at: None,
            });
        }
        let due: Vec<&str> = st
            .revocable(Some(&on_disk), now)
            .iter()
            .map(|p| p.token_id.as_str())
            .collect();
        assert_eq!(due, vec!["b"]);
    }

    #[test]
    fn an_oversized_config_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let mut text = String::from("[DEFAULT]\ntoken = t\n");
        text.push_str(&"; padding\n".repeat((MAX_CONFIG_BYTES / 10 + 1) as usize));
        fs::write(&s.paths().config, text).unwrap();
        assert!(matches!(s.read(), Err(StoreError::TooLarge { .. })));
    }

    #[test]
    fn a_named_profile_gets_its_own_host_and_a_different_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("databrickscfg");
        fs::write(&cfg, "[DEFAULT]\nhost = https://h0\n[p]\n").unwrap();
        let s = Store::open(&cfg, "p").unwrap();
        s.swap(
            None,
            &Token::new("t"),
            Some("https://h1"),
            Duration::from_secs(1),
            None,
            &Utc::now,
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(&cfg).unwrap(),
            "[DEFAULT]\nhost = https://h0\n[p]\nhost = https://h1\ntoken = t\n"
        );
        let snap = s.read().unwrap();
        assert_eq!(snap.host_mismatch(Some("https://h1/")), None);
        assert!(snap
            .host_mismatch(Some("https://other"))
            .is_some_and(|w| w.contains("https://h1") && w.contains("DATABRICKS_HOST")));
    }
}
