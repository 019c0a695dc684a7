//! The soak's SIGSTOP of the rotation lock's holder across a forced window (issue H1: a
//! rotator frozen while it holds the lock killed the shared token). Once, in the middle of
//! the run: the holder is found by its heartbeat (`<config>.rotate.<profile>.beat` changes
//! when a rotator takes the lock), stopped for a whole token lifetime, and resumed. The
//! verdict needs nothing new: the other rotators must keep the token alive and every reader
//! served, and the resumed one must adopt their token.

use super::Driver;
use crate::soak::now_ms;
use crate::soak::report::Span;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the stop did: the process stopped, when, and whether it was seen holding the lock.
pub(super) struct Stopped {
    pid: u32,
    start_ms: i64,
    end_ms: i64,
}

impl Driver<'_> {
    /// Starts the watch for a holder at its moment (file store, two rotators or more, out of
    /// the quiet tail), and records the stop once it is over.
    pub(super) fn stop_holder(&mut self, elapsed: Duration) {
        let (stop_at, length) = (
            self.opts.duration.mul_f64(0.3),
            Duration::from_secs(self.opts.lifetime),
        );
        let fits = elapsed + length * 2 + self.quiet_tail < self.opts.duration;
        // Not with a U2M login: the lock's holder is then stopped mid-refresh, holding the
        // claim on a refresh token that may be on the wire; no other rotator may send it
        // (ARCHITECTURE.md, "OAuth: a refresh token is sent once"), so the token expires
        // while the holder is stopped: safety over liveness, by design.
        if !self.stop_started
            && elapsed >= stop_at
            && fits
            && self.rig.cluster.is_none()
            && self.rig.rotators.len() > 1
            && self.opts.credential != crate::soak::oauth::SoakCredential::U2m
        {
            self.stop_started = true;
            let config = self.rig.profiles[0].0.clone();
            // The neighbour (the last rotator) is alone on its profile: stopping it across its
            // forced window would kill its token by design, not find a fault.
            let neighbour = self
                .rig
                .rotators
                .last()
                .and_then(|r| r.child.as_ref())
                .and_then(tokio::process::Child::id);
            self.stop_task = Some(tokio::task::spawn_blocking(move || {
                stop_the_next_holder(&config, neighbour, length * 2, length)
            }));
        }
        if !self.stop_task.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        let Some(task) = self.stop_task.take() else {
            return;
        };
        // The task has finished: this does not wait.
        let done = futures_util::FutureExt::now_or_never(task)
            .and_then(Result::ok)
            .flatten();
        if let Some(s) = done {
            let which = self
                .rig
                .rotators
                .iter()
                .position(|r| r.child.as_ref().and_then(tokio::process::Child::id) == Some(s.pid))
                .map(|i| format!("rotator {i}"))
                .unwrap_or_else(|| format!("pid {}", s.pid));
            self.seen.faults.push(Span {
                start_ms: s.start_ms,
                end_ms: s.end_ms,
                label: format!("SIGSTOP {which}, seen taking the rotation lock"),
            });
        }
    }
}

/// Watches the heartbeat files beside `config` for up to `watch`; the first that changes
/// names the rotator that just took a rotation lock, which is stopped for `length` (unless
/// it is `spare`'s: then the watch goes on).
fn stop_the_next_holder(
    config: &Path,
    spare: Option<u32>,
    watch: Duration,
    length: Duration,
) -> Option<Stopped> {
    let beats = || heartbeats(config).unwrap_or_default();
    let mut before = beats();
    let until = Instant::now() + watch;
    while Instant::now() < until {
        let now = beats();
        let changed = now
            .iter()
            .find(|(p, text)| text.is_some() && !before.iter().any(|(q, t)| q == p && t == text));
        let pid = changed.and_then(|(_, text)| {
            text.as_ref()?
                .split_whitespace()
                .next()?
                .parse::<u32>()
                .ok()
        });
        if pid.is_some() && pid == spare {
            before = now;
            continue;
        }
        if let Some(pid) = pid {
            let start_ms = now_ms();
            // SAFETY: signals to a rotator process the soak started.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            if holds_write_lock(config, pid) {
                // Stopped inside its write: nobody can write the file until it resumes (the
                // invariant excuses the file then; the simulation holds such locks). This
                // step is about the rotation lock alone: let it go, wait for the next one.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
                before = now;
                continue;
            }
            std::thread::sleep(length);
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            return Some(Stopped {
                pid,
                start_ms,
                end_ms: now_ms(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Whether `pid` holds the write lock readers honour (`<config>.lock`), by `/proc/locks`.
fn holds_write_lock(config: &Path, pid: u32) -> bool {
    let mut lock = config.to_path_buf().into_os_string();
    lock.push(".lock");
    crate::store::lock_holders(Path::new(&lock)).contains(&format!("pid {pid} (FLOCK"))
}

/// Every heartbeat file beside `config` (one per profile whose lock was ever taken) and its
/// content.
fn heartbeats(config: &Path) -> Option<Vec<(PathBuf, Option<String>)>> {
    let prefix = format!("{}.rotate.", config.file_name()?.to_string_lossy());
    let beats = std::fs::read_dir(config.parent()?)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|f| {
                let f = f.to_string_lossy();
                f.starts_with(&prefix) && f.ends_with(".beat")
            })
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).ok();
            (p, text)
        })
        .collect();
    Some(beats)
}
