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

/// How often the holder of a rotation lock shows it makes progress.
const BEAT_EVERY: Duration = Duration::from_millis(500);

/// How a wait for another rotator's rotation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RotationWait {
    /// The holder let go: its token (or its failure) is in the files.
    Free,
    /// Still held at the end of the wait, with a holder that makes progress.
    StillHeld,
    /// The holder's heartbeat stopped: it is stopped, hung, or not a rotator at all.
    Stalled,
}

/// The holder's side of the heartbeat: a counter rewritten in place every [`BEAT_EVERY`]
/// (`<pid> <count>`; a counter, not a time, so no clock is compared across processes).
/// Best effort: a heartbeat that cannot be written makes waiters act alone sooner, never
/// fails the rotation.
struct Heartbeat {
    file: Option<File>,
    count: u64,
}

impl Heartbeat {
    fn open(path: &Path) -> Heartbeat {
        Heartbeat {
            file: files::open_lock(path, true).ok(),
            count: 0,
        }
    }

    fn tick(&mut self) {
        use std::os::unix::fs::FileExt;
        self.count += 1;
        if let Some(file) = &self.file {
            let line = format!("{} {:020}\n", std::process::id(), self.count);
            let _ = file.write_at(line.as_bytes(), 0);
        }
    }
}

/// The heartbeat's current content, if it can be read.
fn read_beat(path: &Path) -> Option<Vec<u8>> {
    files::read_capped(path, files::Follow::No, 64)
        .ok()
        .flatten()
}

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
        // While the work runs, the heartbeat shows waiters that this holder makes progress.
        let mut beat = Heartbeat::open(&self.beat_path());
        let work = f();
        tokio::pin!(work);
        let mut ticker = tokio::time::interval(BEAT_EVERY);
        let out = loop {
            tokio::select! {
                biased;
                out = &mut work => break out,
                _ = ticker.tick() => beat.tick(),
            }
        };
        drop(guard);
        Ok(Some(out))
    }

    /// `<config>.rotate.<8 hex digits of the profile>.beat`: the heartbeat of this profile's
    /// rotation lock holder.
    pub(crate) fn beat_path(&self) -> std::path::PathBuf {
        let mut name = self.paths.rotate_lock.clone().into_os_string();
        name.push(format!(
            ".{:08x}.beat",
            files::profile_offset(&self.profile)
        ));
        std::path::PathBuf::from(name)
    }

    /// Waits until no rotator of this profile holds its rotation lock, at most `limit`;
    /// with `stall`, gives up early when the holder's heartbeat has not moved for that long
    /// (a stopped process, a foreign lock holder): [`RotationWait::Stalled`].
    pub(crate) async fn wait_rotation(
        &self,
        limit: Duration,
        stall: Option<Duration>,
    ) -> Result<RotationWait, StoreError> {
        let mut file = self.open_rotation_lock()?;
        let started = tokio::time::Instant::now();
        let beat_path = self.beat_path();
        let mut last_beat = read_beat(&beat_path);
        // A holder already seen making no progress, whose heartbeat has not moved since,
        // has been stalled since then: one stuck holder costs one stall wait, not one per
        // turn (the soak's foreign `lockf` cost a wait at the interval and another at the
        // forced window, past the provider's margin).
        let mut progress_at = self
            .rotation_stall
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(beat, _)| *beat == last_beat)
            .map_or(started, |(_, since)| since);
        loop {
            match self.try_rotation_lock(file)? {
                Ok(_free) => return Ok(RotationWait::Free),
                Err(again) => file = again,
            }
            let now = tokio::time::Instant::now();
            let beat = read_beat(&beat_path);
            if beat.is_some() && beat != last_beat {
                progress_at = now;
                last_beat = beat;
            }
            let outcome = if stall.is_some_and(|s| now - progress_at >= s) {
                Some(RotationWait::Stalled)
            } else {
                (now - started > limit).then_some(RotationWait::StillHeld)
            };
            if let Some(outcome) = outcome {
                *self
                    .rotation_stall
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((last_beat, progress_at));
                return Ok(outcome);
            }
            tokio::time::sleep(ROTATION_POLL).await;
        }
    }

    /// Waits until no rotator of this profile holds its rotation lock (a winner finished),
    /// at most `limit`: `Ok(false)` when it was still held then.
    pub(crate) async fn wait_rotation_free(&self, limit: Duration) -> Result<bool, StoreError> {
        Ok(self.wait_rotation(limit, None).await? == RotationWait::Free)
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

    /// The lock file for a reader, never created: a read (`status`, `token`) leaves no file
    /// and no directory behind. Without one, no writer has ever locked the file, and the
    /// config is only ever replaced whole, so it is read as it is.
    fn open_lock_file_to_read(path: &Path) -> Result<Option<File>, StoreError> {
        files::open_regular(path, files::Follow::No).map_err(io_err("open lock file", path))
    }

    /// Runs `f` holding the write lock shared (readers), waiting at most the read wait.
    pub(crate) fn with_read_lock<T>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(file) = Self::open_lock_file_to_read(&self.paths.lock)? else {
            return f();
        };
        let lock = RwLock::new(file);
        let (started, wait) = (Instant::now(), self.read_wait_now());
        let _guard = loop {
            match lock.try_read() {
                Ok(guard) => break guard,
                Err(e) if e.kind() == ErrorKind::WouldBlock && started.elapsed() < wait => {
                    std::thread::sleep(LOCK_POLL)
                }
                Err(e) => {
                    let stuck = e.kind() == ErrorKind::WouldBlock;
                    self.stuck
                        .store(stuck, std::sync::atomic::Ordering::Relaxed);
                    return Err(self.lock_error(e, wait));
                }
            }
        };
        self.stuck
            .store(false, std::sync::atomic::Ordering::Relaxed);
        f()
    }

    /// How long a read waits for the lock now: the read wait, or nothing while the last
    /// read found the lock held past it.
    pub(crate) fn read_wait_now(&self) -> Duration {
        match self.stuck.load(std::sync::atomic::Ordering::Relaxed) {
            true => Duration::ZERO,
            false => self.read_wait,
        }
    }

    /// Runs `f` holding the write lock shared if no writer holds it now: `None` (and `f` not
    /// run) when one does.
    pub(crate) fn with_read_lock_now<T>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Option<Result<T, StoreError>> {
        let lock = match Self::open_lock_file_to_read(&self.paths.lock) {
            Ok(Some(file)) => RwLock::new(file),
            Ok(None) => return Some(f()),
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

/// Who holds locks on `path`, from `/proc/locks` ("pid 1234 (flock WRITE)"), for the log
/// line that says why a write waited; "unknown" where it cannot be read.
pub(crate) fn lock_holders(path: &std::path::Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return "unknown".into();
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return "unknown".into();
    };
    let holders = lock_holders_in(&locks, meta.dev(), meta.ino());
    if holders.is_empty() {
        "none seen".into()
    } else {
        holders.join(", ")
    }
}

/// The holders of locks on the file `(dev, ino)` as `/proc/locks` lists them (`locks` is
/// its text): "pid 1234 (FLOCK WRITE)", or "an open file description (OFDLCK READ)" for
/// an OFD lock, whose owner the kernel does not name. Waiters (`->`) are left out.
pub(crate) fn lock_holders_in(locks: &str, dev: u64, ino: u64) -> Vec<String> {
    let (major, minor) = (libc_major(dev), libc_minor(dev));
    locks
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // "1:" kind class mode pid maj:min:ino start end
            let (kind, mode, pid, id) = (f.get(1)?, f.get(3)?, f.get(4)?, f.get(5)?);
            let mut parts = id.split(':');
            let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
            let min = u64::from_str_radix(parts.next()?, 16).ok()?;
            let i: u64 = parts.next()?.parse().ok()?;
            ((maj, min, i) == (major, minor, ino)).then(|| match *pid {
                "-1" => format!("an open file description ({kind} {mode})"),
                pid => format!("pid {pid} ({kind} {mode})"),
            })
        })
        .collect()
}

/// The major and minor numbers of a `dev_t` (glibc's encoding, as `major(3)`/`minor(3)`).
fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

#[cfg(test)]
mod holder_tests {
    use super::*;

    #[test]
    fn holders_of_one_file_are_named_by_pid_and_waiters_are_left_out() {
        let text = "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF\n\
                    1: -> FLOCK  ADVISORY  WRITE 777 08:01:1234 0 EOF\n\
                    2: OFDLCK ADVISORY  READ  -1 08:01:1234 0 0\n\
                    3: POSIX  ADVISORY  WRITE 99 08:01:999 0 EOF\n";
        let dev = (8u64 << 8) | 1;
        assert_eq!(
            lock_holders_in(text, dev, 1234),
            vec![
                "pid 4242 (FLOCK WRITE)".to_string(),
                "an open file description (OFDLCK READ)".to_string()
            ]
        );
        assert!(lock_holders_in(text, dev, 5).is_empty());
    }

    #[test]
    fn a_lock_taken_here_is_found_in_proc_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let file = std::fs::File::create(&path).unwrap();
        let mut lock = fd_lock::RwLock::new(file);
        let _guard = lock.write().unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        let holders = lock_holders_in(&locks, meta.dev(), meta.ino());
        // Contained, not equal: other tests of this process lock files at the same time, and
        // on an overlay file system /proc/locks may name another file by the same numbers.
        let ours = format!("pid {} (FLOCK WRITE)", std::process::id());
        assert!(holders.contains(&ours), "{holders:?}");
    }
}
