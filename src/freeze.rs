//! Notices that this process was stopped (SIGSTOP, a stopped container, a debugger, a
//! suspended laptop): a timer that fires far later than it was set for. Each such wake-up
//! starts a new *epoch*.
//!
//! Why: a process that resumes holds what it read before the stop, and the world moved on
//! meanwhile (another rotator replaced the token and revoked the old one after its grace).
//! Anything it was about to send with that old knowledge (a retry, the next call of a reap)
//! must be read again first: work that spans an epoch change starts over from a fresh read.
//! Process-wide on purpose: a stop stops every task of the process alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static EPOCH: AtomicU64 = AtomicU64::new(0);

/// How often the watch looks, and how late a look may be before it counts as a stop (a
/// busy machine delays a timer by milliseconds, a stop by seconds). A look costs an idle
/// rotator two context switches: at 4 a second they were most of its cost (`scripts/bench.sh`:
/// 67 switches per rotation on tmpfs against 15 before the watch); once a second, a stop
/// longer than about 2 s is still seen, which is what matters (a shorter one leaves nothing
/// stale that a provider's answer would not also show).
const TICK: Duration = Duration::from_secs(1);
const LATE: Duration = Duration::from_secs(2);

/// The current epoch: it changes each time the process is seen to resume from a stop.
pub(crate) fn epoch() -> u64 {
    EPOCH.load(Ordering::SeqCst)
}

/// Whether the process was stopped since `epoch` was taken.
pub(crate) fn resumed_since(epoch: u64) -> bool {
    self::epoch() != epoch
}

/// Counts a resume.
fn note_resumed(late: Duration) {
    EPOCH.fetch_add(1, Ordering::SeqCst);
    tracing::warn!(
        event = "resumed",
        stopped_s = late.as_secs_f64(),
        "this process was stopped (SIGSTOP, a frozen container, a debugger?) and resumed; what it read before is read again before it acts"
    );
}

/// Runs until dropped: a timer every [`TICK`], and a resume counted when one fires more
/// than [`LATE`] after it was due.
pub(crate) async fn watch() {
    let mut due = tokio::time::Instant::now() + TICK;
    loop {
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        let late = now.saturating_duration_since(due);
        if late > LATE {
            note_resumed(late);
        }
        due = now + TICK;
    }
}
