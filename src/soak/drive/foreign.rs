//! What other actors on the host and in the workspace do to the rotators' world (issue 32,
//! H2 and N1), once each in a file-store soak:
//! - a foreign process holds the whole rotation lock (`lockf` on `<config>.rotate.lock`)
//!   for a token lifetime: the waiters see no heartbeat and rotate on their own;
//! - a reader that honours the write lock hangs while holding it (`flock -s` on
//!   `<config>.lock`) across a rotation: the minted token is served through the metadata
//!   endpoint and the proxy meanwhile, and written the moment the lock frees;
//! - an admin revokes the file's token out of band: the rotators find out within one check
//!   period plus one turn, and the verdict allows the reads with that token only until then.
//!
//! The locks are taken by the soak's own process with the kernel's lock calls, as `flock`
//! and `lockf` take them; the simulation (`sim.rs`) holds its foreign locks the same way.

use super::Driver;
use crate::soak::now_ms;
use crate::soak::report::Span;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which lock a foreign process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForeignLock {
    /// `flock -s <config>.lock`: a reader that honours the lock and hangs; writes wait.
    SharedWrite,
    /// `flock -x <config>.lock`: readers and writes wait (the simulation's; the soak's file
    /// readers would only see gaps).
    #[cfg_attr(not(test), allow(dead_code))]
    ExclusiveWrite,
    /// `lockf` on all of `<config>.rotate.lock`: every profile's rotation lock.
    WholeRotation,
}

impl ForeignLock {
    /// The file this lock is taken on, beside `config`.
    pub(crate) fn path(self, config: &Path) -> PathBuf {
        let mut path = config.to_path_buf().into_os_string();
        path.push(match self {
            ForeignLock::WholeRotation => ".rotate.lock",
            _ => ".lock",
        });
        PathBuf::from(path)
    }

    /// Takes the lock without waiting; the open file holds it until dropped. `None` when
    /// somebody else holds it now (or the file cannot be opened).
    pub(crate) fn take(self, config: &Path) -> Option<std::fs::File> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(config))
            .ok()?;
        let fd = file.as_raw_fd();
        let held = match self {
            // SAFETY: flock on a descriptor we own.
            ForeignLock::SharedWrite => unsafe {
                libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) == 0
            },
            ForeignLock::ExclusiveWrite => unsafe {
                libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0
            },
            ForeignLock::WholeRotation => {
                // A whole-file record lock (start 0, length 0), as `lockf` takes it; an
                // open-file-description lock, so the soak's own threads cannot share it.
                // SAFETY: an all-zero flock struct is valid; F_OFD_SETLK only reads it.
                let mut range: libc::flock = unsafe { std::mem::zeroed() };
                range.l_type = libc::F_WRLCK as libc::c_short;
                range.l_whence = libc::SEEK_SET as libc::c_short;
                unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &range) == 0 }
            }
        };
        held.then_some(file)
    }
}

/// The steps of [`Driver::foreign`] done, as bits of `Driver::foreign_done`.
const ROTATION_LOCK: u8 = 1;
const WRITE_LOCK: u8 = 2;
const REVOCATION: u8 = 4;

/// A token revoked behind the rotators' backs: which, and when.
#[derive(Debug, Clone)]
pub(crate) struct Revoked {
    pub token_id: String,
    pub fingerprint: String,
    pub at_ms: i64,
}

/// A foreign lock in force: the open file that holds it, which lock, when it ends, its
/// span's start.
pub(super) struct Held {
    _file: std::fs::File,
    lock: ForeignLock,
    until: Instant,
    start_ms: i64,
    label: String,
}

impl Held {
    pub(super) fn on_rotation_lock(&self) -> bool {
        self.lock == ForeignLock::WholeRotation
    }
}

impl Driver<'_> {
    /// The foreign lock holders and the revocation, each once at its moment (file store
    /// only: a replica of the cluster store keeps a file of its own).
    pub(super) fn foreign(&mut self, elapsed: Duration) {
        if self.rig.cluster.is_some() {
            return;
        }
        self.release_foreign_lock(false);
        let lifetime = Duration::from_secs(self.opts.lifetime);
        let (duration, tail) = (self.opts.duration, self.quiet_tail);
        let at = |fraction: f64| duration.mul_f64(fraction);
        let before_tail = |length: Duration| elapsed + length + tail < duration;
        // Between provider faults (see `Driver::fault`).
        if self.foreign_done & ROTATION_LOCK == 0
            && elapsed >= at(0.1)
            && before_tail(lifetime)
            && self.fault_ends.is_none()
        {
            self.foreign_done |= ROTATION_LOCK;
            self.hold_foreign_lock(ForeignLock::WholeRotation, lifetime);
        }
        // From just after a token reaches the file until shortly before the readers' margin
        // of the first token of the file to expire (the lock keeps every profile from being
        // written): the next rotation (at the interval while busy, in the forced window while
        // idle) usually falls inside it and is held and served; no token on disk dies in it.
        if self.foreign_done & WRITE_LOCK == 0 && elapsed >= at(0.65) {
            let on_disk = self.file_readers[0].token().ok().flatten();
            let on_disk = on_disk.map(|t| t.fingerprint());
            let margin = crate::soak::near_expiry_margin(&self.opts) + Duration::from_secs(2);
            let hold = self
                .first_expiry_in_file()
                .map(|left| left.saturating_sub(margin));
            match (&self.foreign_armed, hold) {
                (None, _) => self.foreign_armed = Some(on_disk),
                (Some(before), Some(hold))
                    if *before != on_disk
                        && hold >= Duration::from_secs(self.opts.interval)
                        && before_tail(hold) =>
                {
                    self.foreign_done |= WRITE_LOCK;
                    self.hold_foreign_lock(ForeignLock::SharedWrite, hold);
                }
                (Some(before), _) if *before != on_disk => self.foreign_armed = Some(on_disk),
                _ => {}
            }
        }
        if self.foreign_done & REVOCATION == 0 && elapsed >= at(0.8) && before_tail(Duration::ZERO)
        {
            self.foreign_done |= REVOCATION;
            self.revoke_out_of_band();
        }
    }

    /// How long the first token of the shared file to expire has left, by the emulator's
    /// record (every profile of the file: the neighbour's too).
    fn first_expiry_in_file(&self) -> Option<Duration> {
        let emu = &self.rig.emulator.as_ref()?.emulator;
        let now = emu.now();
        let config = &self.rig.profiles[0].0;
        self.rig
            .profiles
            .iter()
            .zip(&self.file_readers)
            .filter(|((file, _), _)| file == config)
            .map(|(_, reader)| {
                let token = reader.token().ok().flatten()?;
                let expires_at = emu.lookup(&token)?.expires_at?;
                (expires_at - now).to_std().ok()
            })
            .collect::<Option<Vec<Duration>>>()?
            .into_iter()
            .min()
    }

    fn hold_foreign_lock(&mut self, lock: ForeignLock, length: Duration) {
        let config = self.rig.profiles[0].0.clone();
        let label = match lock {
            ForeignLock::WholeRotation => "foreign lockf on the rotation lock",
            ForeignLock::SharedWrite => "foreign flock -s on the write lock",
            ForeignLock::ExclusiveWrite => "foreign flock -x on the write lock",
        };
        match lock.take(&config) {
            Some(file) => {
                self.foreign_lock = Some(Held {
                    _file: file,
                    lock,
                    until: Instant::now() + length,
                    start_ms: now_ms(),
                    label: label.into(),
                })
            }
            None => self.seen.faults.push(Span {
                start_ms: now_ms(),
                end_ms: now_ms(),
                label: format!("{label}: not taken (held at that moment)"),
            }),
        }
    }

    /// Lets a foreign lock go once its time is up (or at the end of the run: `now`).
    pub(super) fn release_foreign_lock(&mut self, now: bool) {
        let due = self
            .foreign_lock
            .as_ref()
            .is_some_and(|h| now || Instant::now() >= h.until);
        if !due {
            return;
        }
        if let Some(held) = self.foreign_lock.take() {
            self.seen.faults.push(Span {
                start_ms: held.start_ms,
                end_ms: now_ms(),
                label: held.label,
            });
        }
    }

    /// Revokes the token the shared profile's file holds now, as an admin or a leak
    /// response would (PATs only: an OAuth access token cannot be revoked alone).
    fn revoke_out_of_band(&mut self) {
        let Some(emu) = &self.rig.emulator else {
            return;
        };
        if self.opts.credential != crate::soak::oauth::SoakCredential::Pat {
            return;
        }
        let Some(token) = self.file_readers[0].token().ok().flatten() else {
            return;
        };
        let Some(record) = emu.emulator.lookup(&token) else {
            return;
        };
        emu.emulator.revoke(&token);
        let at_ms = now_ms();
        self.seen.faults.push(Span {
            start_ms: at_ms,
            end_ms: at_ms,
            label: format!("token {} revoked out of band", record.token_id),
        });
        self.seen.revocations.push(Revoked {
            token_id: record.token_id,
            fingerprint: token.fingerprint(),
            at_ms,
        });
    }
}
