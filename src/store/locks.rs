//! The store's locks: the write lock readers also honour (`<config>.lock`, shared for
//! reads, exclusive for writes, each wait bounded), and the per-profile rotation lock
//! (`<config>.rotate.lock`) that makes one rotator of a profile mint at a time.
//!
//! Invariant: no wait is unbounded; a lock still held at the end of its wait is
//! `StoreError::Busy`, which says what to do.

use super::{files, io_err, Store, StoreError};
use fd_lock::RwLock;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often a rotator waiting for another's rotation looks again.
const ROTATION_POLL: Duration = Duration::from_millis(50);

/// How often a waiting reader or writer tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(5);

impl Store {
    fn open_lock_file(path: &Path) -> Result<File, StoreError> {
        files::open_lock(path, false).map_err(io_err("open lock file", path))
    }

    /// Runs `f` holding this profile's rotation lock in `<config>.rotate.lock`, taken without
    /// waiting: `Ok(None)` (and `f` not run) when another rotator of this profile holds it.
    /// The lock is held across `f`'s awaits (the mint) and released when `f` ends, however
    /// it ends. Rotators of other profiles of the file take other locks.
    pub(crate) async fn try_rotation<T, F, Fut>(&self, f: F) -> Result<Option<T>, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let Ok(guard) = self.try_rotation_lock(self.open_rotation_lock()?)? else {
            return Ok(None);
        };
        let out = f().await;
        drop(guard);
        Ok(Some(out))
    }

    /// Waits until no rotator of this profile holds its rotation lock (a winner finished),
    /// at most `limit`: `Ok(false)` when it was still held then.
    pub(crate) async fn wait_rotation_free(&self, limit: Duration) -> Result<bool, StoreError> {
        // One open for the whole wait: each close of a file opened for writing would wake
        // the directory watch.
        let mut file = self.open_rotation_lock()?;
        let started = Instant::now();
        loop {
            match self.try_rotation_lock(file)? {
                Ok(_free) => return Ok(true),
                Err(again) => file = again,
            }
            if started.elapsed() > limit {
                return Ok(false);
            }
            tokio::time::sleep(ROTATION_POLL).await;
        }
    }

    fn open_rotation_lock(&self) -> Result<File, StoreError> {
        let path = &self.paths.rotate_lock;
        files::open_lock(path, true).map_err(io_err("open lock file", path))
    }

    fn try_rotation_lock(
        &self,
        file: File,
    ) -> Result<Result<files::ProfileLock, File>, StoreError> {
        files::try_profile_lock(file, &self.profile)
            .map_err(io_err("lock", &self.paths.rotate_lock))
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
    pub(crate) fn with_read_lock<T>(
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

    /// Runs `f` holding the write lock shared if no writer holds it now: `None` (and `f` not
    /// run) when one does.
    pub(crate) fn with_read_lock_now<T>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Option<Result<T, StoreError>> {
        let lock = match Self::open_lock_file(&self.paths.lock) {
            Ok(file) => RwLock::new(file),
            Err(e) => return Some(Err(e)),
        };
        let _guard = match lock.try_read() {
            Ok(guard) => guard,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => return Some(Err(io_err("lock", &self.paths.lock)(e))),
        };
        Some(f())
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
}
