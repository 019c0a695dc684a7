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

mod credential;
mod files;
mod locks;
pub(crate) use locks::{lock_holders, RotationWait};
mod state;
#[cfg(test)]
mod tests;

pub(crate) use credential::{BoxFuture, Clock, CredentialStore, ForSwap, StateEdit};
pub use files::FileVersion;
pub use files::Paths;
pub use files::{atomic_write, atomic_write_private, NOT_A_REGULAR_FILE};
pub(crate) use files::{read_capped, Follow};
pub(crate) use state::revoke_not_before;
pub use state::PendingRevocation;
pub use state::Rotation;
pub use state::{BootDeadline, Login, RefreshClaim, State};

use crate::ini::{self, IniError};
use crate::policy::TokenTimes;
use crate::Token;
use chrono::{DateTime, Utc};
use files::{remove_stale_temps, temp_prefix};
use state::StateFile;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// A backend's own failure (the cluster store's API errors), whose message says what to
    /// do; `transient` says whether the loop keeps serving and retries, or reports it.
    #[error("{error}")]
    Backend {
        error: Box<dyn std::error::Error + Send + Sync>,
        transient: bool,
    },
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
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
    /// How long a writer waits for the lock (`PAT_WRITE_LOCK_WAIT`).
    write_wait: Duration,
    /// The config directory's watch, made on first use (only the rotation loop needs one).
    watch: std::sync::Arc<std::sync::OnceLock<crate::watch::FileWatch>>,
    /// Whether the files are on a local file system, learnt on first use.
    local: std::sync::Arc<std::sync::OnceLock<bool>>,
    /// A read found the lock held past its wait (a writer stopped or hung while it holds
    /// it): until a read gets the lock again, reads do not wait, so one stuck holder costs
    /// one wait, not one per read (a turn's read, the re-read before a mint, serving).
    stuck: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The rotation lock's holder as a wait last left it: its heartbeat and when it last
    /// moved (see `Store::wait_rotation`).
    rotation_stall: std::sync::Arc<std::sync::Mutex<Option<RotationStall>>>,
}

/// A heartbeat's content and the instant it was last seen to change.
type RotationStall = (Option<Vec<u8>>, tokio::time::Instant);

/// Writers hold the lock for milliseconds; a reader that waits this long has found a stuck one.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(10);

impl Store {
    pub fn open(config: &Path, profile: &str) -> Result<Store, StoreError> {
        Ok(Store {
            paths: Paths::for_config(config)?,
            profile: profile.to_string(),
            read_wait: DEFAULT_READ_WAIT,
            write_wait: DEFAULT_READ_WAIT,
            watch: Default::default(),
            local: Default::default(),
            stuck: Default::default(),
            rotation_stall: Default::default(),
        })
    }

    /// The same store with another reader wait (a manual write waits `PAT_WRITE_LOCK_WAIT`).
    pub fn with_read_wait(mut self, wait: Duration) -> Store {
        self.read_wait = wait;
        self
    }

    /// The same store with another writer wait (`PAT_WRITE_LOCK_WAIT`), for the writes the
    /// [`CredentialStore`] interface makes.
    pub fn with_write_wait(mut self, wait: Duration) -> Store {
        self.write_wait = wait;
        self
    }

    fn watch(&self) -> &crate::watch::FileWatch {
        self.watch
            .get_or_init(|| crate::watch::FileWatch::new(&self.paths.config))
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

    /// Makes the state file 0600 again if someone loosened it (it names the token's id and
    /// fingerprint); says so when it did.
    pub fn tighten_state(&self) -> Option<String> {
        let mode = fs::metadata(&self.paths.state).ok()?.permissions().mode() & 0o7777;
        if mode & 0o077 == 0 {
            return None;
        }
        let fixed = fs::set_permissions(&self.paths.state, fs::Permissions::from_mode(0o600));
        Some(match fixed {
            Ok(()) => format!(
                "{} had mode {mode:04o}; set it back to 0600",
                self.paths.state.display()
            ),
            Err(e) => format!(
                "{} has mode {mode:04o} and cannot be set to 0600 ({e}); run `chmod 600 {}`",
                self.paths.state.display(),
                self.paths.state.display()
            ),
        })
    }

    /// A warning when the config file's directory is writable by group or others.
    pub fn directory_warning(&self) -> Option<String> {
        files::directory_warning(self.paths.config.parent()?)
    }

    /// Reads the config file text; a missing file reads as empty.
    fn read_config_text(&self) -> Result<String, StoreError> {
        self.read_config_versioned().map(|(text, _)| text)
    }

    /// The config file's text (at most [`MAX_CONFIG_BYTES`]) and the version of the very file
    /// it was read from (`fstat` of the open file), so a cache can never pair an old version
    /// with new content or the reverse. A missing file reads as empty, version `None`.
    fn read_config_versioned(&self) -> Result<(String, Option<FileVersion>), StoreError> {
        use std::io::Read;
        let file = match files::open_regular(&self.paths.config, Follow::Yes) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok((String::new(), None)),
            Err(e) => return Err(io_err("read", &self.paths.config)(e)),
        };
        let version = file
            .metadata()
            .map(|m| FileVersion::of(&m))
            .map_err(io_err("stat", &self.paths.config))?;
        let mut text = String::new();
        let read = file
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io_err("read", &self.paths.config));
        match read {
            Ok(n) if n as u64 > MAX_CONFIG_BYTES => Err(StoreError::TooLarge {
                path: self.paths.config.clone(),
            }),
            Ok(_) => Ok((text, Some(version))),
            Err(e) => Err(e),
        }
    }

    /// The profile's token and the version of the file it came from, under the shared lock:
    /// what the library [`crate::reader::Reader`] caches.
    pub fn read_token_versioned(&self) -> Result<(Option<Token>, Option<FileVersion>), StoreError> {
        self.with_read_lock(|| {
            let (text, version) = self.read_config_versioned()?;
            let (token, _) = self.parse_token(&text)?;
            Ok((token, version))
        })
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
        match files::read_capped(&self.paths.state, Follow::No, MAX_CONFIG_BYTES) {
            Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(file) => (file, None),
                Err(e) => (StateFile::default(), Some(e.to_string())),
            },
            Ok(None) => (StateFile::default(), None),
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

    /// The snapshot, read on the calling thread where that cannot hold the thread up: the
    /// files are on a local file system (the read is a copy from the page cache, as nginx
    /// reads files on its event loop) and no writer holds the lock now. `None` otherwise:
    /// the caller hands [`Store::read`] to a thread, which may wait for the lock or for a
    /// network file system. On an idle rotator each read handed over cost about three
    /// context switches, and a rotation made three of them. The file system is learnt once
    /// the directory exists (a first rotation may create it).
    pub(crate) fn read_in_place(&self) -> Option<Result<Snapshot, StoreError>> {
        let local = match self.local.get() {
            Some(local) => *local,
            None => {
                let dir = files::dir_of(&self.paths.config);
                if !dir.is_dir() {
                    return None;
                }
                *self
                    .local
                    .get_or_init(|| crate::watch::is_local_file_system(dir))
            }
        };
        if !local {
            return None;
        }
        self.with_read_lock_now(|| self.snapshot_unlocked())
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
        atomic_write_private(&self.paths.state, &json)
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

    /// Writes a copy of a credential kept elsewhere (the cluster store) into this file:
    /// `token` unconditionally and the state `edit` makes of the local one (it is told the
    /// token the file held), under one exclusive lock, with the same write order as
    /// [`Store::swap`]. Returns whether anything changed; nothing is written when nothing
    /// would change.
    pub fn write_copy(
        &self,
        token: &Token,
        host: Option<&str>,
        wait: Duration,
        edit: impl FnOnce(Option<&Token>, &mut State),
    ) -> Result<bool, StoreError> {
        if token.is_empty() {
            return Err(StoreError::EmptyToken);
        }
        self.with_write_lock(wait, || {
            let text = self.read_config_text()?;
            let (current, current_host) = self.parse_token(&text)?;
            let (before, _) = self.read_state();
            let mut state = before.clone();
            edit(current.as_ref(), &mut state);
            if current.as_ref() == Some(token) {
                if state == before {
                    return Ok(false);
                }
                self.write_state_unlocked(&state)?;
                return Ok(true);
            }
            self.commit_unlocked(&state, &text, token, host, current_host.as_deref())?;
            Ok(true)
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
        let dir = files::dir_of(&self.paths.config);
        files::create_private_dir(dir).map_err(io_err("create directory", dir))?;
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        // A swap replaces the state, then the config, one temp file at a time, and each
        // rename frees the file it replaces: the peak need is the larger file plus the
        // state's growth by one record. (Asking for more would refuse a disk that can take
        // the write: a 16 KiB tmpfs with one free page.)
        let needed = size(&self.paths.config).max(size(&self.paths.state) + 512);
        let mut probe = tempfile::Builder::new()
            .prefix(&temp_prefix(&self.paths.config))
            .tempfile_in(dir)
            .map_err(io_err("create a file in", dir))?;
        let zeros = vec![0u8; needed.min(MAX_CONFIG_BYTES * 2) as usize];
        // No fsync: `write` already takes the space (tmpfs allocates, ext4, XFS and btrfs
        // reserve for delayed allocation, and each says ENOSPC or EDQUOT there), and the
        // probe's data is thrown away. An fsync here cost a rotation four context switches
        // on ext4 for nothing; where a filesystem only fails at fsync (NFS), the swap's own
        // fsync fails and the minted token is revoked unwritten.
        probe
            .write_all(&zeros)
            .map_err(io_err("write a file in", dir))?;
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
                let _ = atomic_write_private(&self.paths.state, &json);
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

/// The largest config (and state) file accepted. Real ones are a few hundred bytes; a reader re-reads the
/// file after every change, so an unbounded one would cost unbounded memory per request.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
