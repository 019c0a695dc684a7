//! Token deadlines on clocks a wall-clock step cannot move: this process's monotonic
//! deadlines of the tokens it minted (`Deadlines`), and the host's clock since boot, for
//! expiries that outlive a process. A token's deadline on
//! this clock, with the boot's id, is written beside its wall-clock expiry, so that a
//! rotator restarted on the same host after the wall clock stepped still knows how long the
//! token lives: back, a dead token would look live and be served; forward, a live token
//! would look dead and never be sent (issue 32, N3, and the simulation's open finding).
//!
//! Invariant: a deadline is read back only on the boot that wrote it (another host, a
//! reboot: the id differs, and the wall-clock record is all there is). `CLOCK_BOOTTIME`
//! counts a suspend, as a token's life does.

use crate::store::BootDeadline;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The monotonic deadline of each token this process minted (by SHA-256), the latest few.
/// A wall-clock step moves `expires_at - now` but not these: see `Shared::plan_times`.
#[derive(Default)]
pub(crate) struct Deadlines(Vec<(String, Instant)>);

/// How many minted tokens' deadlines are kept (the current one and a few replaced ones).
const DEADLINES_KEPT: usize = 8;

impl Deadlines {
    pub(crate) fn record(&mut self, token: &crate::Token, deadline: Instant) {
        let key = token.sha256_hex();
        self.0.retain(|(k, _)| *k != key);
        self.0.push((key, deadline));
        if self.0.len() > DEADLINES_KEPT {
            self.0.remove(0);
        }
    }

    pub(crate) fn of(&self, token: &crate::Token) -> Option<Instant> {
        let key = token.sha256_hex();
        self.0.iter().find(|(k, _)| *k == key).map(|(_, at)| *at)
    }
}

/// The time from now to `deadline` on the monotonic clock (negative once past).
pub(crate) fn time_left(deadline: Instant) -> chrono::TimeDelta {
    use chrono::TimeDelta;
    let now = Instant::now();
    if deadline >= now {
        TimeDelta::from_std(deadline - now).unwrap_or(TimeDelta::MAX)
    } else {
        -TimeDelta::from_std(now - deadline).unwrap_or(TimeDelta::MAX)
    }
}

/// This boot's id and its clock.
#[derive(Clone)]
pub(crate) struct BootClock {
    id: Option<Arc<str>>,
    since_boot: fn() -> Option<Duration>,
}

impl BootClock {
    /// The host's: `/proc/sys/kernel/random/boot_id` and `CLOCK_BOOTTIME` (none where the id
    /// cannot be read). Unit tests and the simulation run many "processes" in one runtime
    /// in paused time: theirs follows tokio's clock, one boot for the whole test.
    pub(crate) fn host() -> BootClock {
        #[cfg(not(test))]
        {
            let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            BootClock {
                id: id.map(Arc::from),
                since_boot: boottime,
            }
        }
        #[cfg(test)]
        {
            BootClock {
                id: Some(Arc::from("test-boot")),
                since_boot: tokio_since_zero,
            }
        }
    }

    /// `deadline` as a record that outlives this process.
    pub(crate) fn stamp(&self, deadline: Instant) -> Option<BootDeadline> {
        let now = (self.since_boot)()?;
        let left = deadline.saturating_duration_since(Instant::now());
        Some(BootDeadline {
            boot: self.id.as_deref()?.to_string(),
            at_ms: (now + left).as_millis() as u64,
        })
    }

    /// The deadline a record of this boot gives, on this process's monotonic clock; `None`
    /// for another boot's.
    pub(crate) fn deadline(&self, stamp: &BootDeadline) -> Option<Instant> {
        if self.id.as_deref() != Some(stamp.boot.as_str()) {
            return None;
        }
        let now = (self.since_boot)()?;
        let at = Duration::from_millis(stamp.at_ms);
        Some(match at.checked_sub(now) {
            Some(left) => Instant::now() + left,
            None => {
                let ago = now - at;
                Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
            }
        })
    }
}

/// `CLOCK_BOOTTIME`: the monotonic clock, suspends included.
#[cfg(not(test))]
fn boottime() -> Option<Duration> {
    // SAFETY: an all-zero timespec is valid; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Tokio's clock (paused or not) from a fixed point before any runtime of the test process.
#[cfg(test)]
fn tokio_since_zero() -> Option<Duration> {
    static ZERO: std::sync::LazyLock<std::time::Instant> = std::sync::LazyLock::new(|| {
        let now = std::time::Instant::now();
        now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now)
    });
    Instant::now().into_std().checked_duration_since(*ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stamp_read_back_on_the_same_boot_gives_the_same_deadline() {
        let clock = BootClock::host();
        let deadline = Instant::now() + Duration::from_secs(20);
        let stamp = clock.stamp(deadline).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let back = clock.deadline(&stamp).unwrap();
        assert!(back.max(deadline) - back.min(deadline) <= Duration::from_millis(1));
        // Past, too.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let back = clock.deadline(&stamp).unwrap();
        assert!(back <= Instant::now() - Duration::from_secs(14));
        // Another boot's record gives nothing.
        let other = BootDeadline {
            boot: "another".into(),
            ..stamp
        };
        assert!(clock.deadline(&other).is_none());
    }
}
