//! Session leases: how workloads tell the rotator they are active.
//!
//! Invariant: a lease counts as active only until its deadline (`PAT_SESSION_TTL` after
//! creation or the last heartbeat), so a client that crashed without saying goodbye cannot
//! pin the rotator busy. Opening a lease wakes the loop (an overdue interval rotation may now
//! be due); expiries need no wake-up, they only ever make rotation less urgent.

use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The most leases open at once. Far above any real workload (one lease per active client
/// process), low enough that a flood from a local process costs bounded memory; past it,
/// opening answers 429.
pub const MAX_OPEN_SESSIONS: usize = 4096;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    /// Seconds until it expires without a heartbeat.
    pub ttl: u64,
}

/// Opening a lease was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("{open} session leases are open, the most this rotator keeps; close unused ones (DELETE /v1/sessions/{{id}}) or let them expire")]
    Full { open: usize },
}

/// Leases by id, and the same leases ordered by deadline so that expired ones are dropped
/// from the front: open, heartbeat and close cost O(log n), never a scan of every lease.
#[derive(Debug, Default)]
struct Leases {
    by_id: HashMap<String, Instant>,
    by_deadline: BTreeSet<(Instant, String)>,
    opened: u64,
    closed: u64,
    expired: u64,
}

impl Leases {
    fn purge(&mut self, now: Instant) {
        while let Some(first) = self.by_deadline.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, id)) = self.by_deadline.pop_first() {
                self.by_id.remove(&id);
                self.expired += 1;
            }
        }
    }

    fn insert(&mut self, id: String, deadline: Instant) {
        if let Some(old) = self.by_id.insert(id.clone(), deadline) {
            self.by_deadline.remove(&(old, id.clone()));
        }
        self.by_deadline.insert((deadline, id));
    }

    fn remove(&mut self, id: &str) -> bool {
        match self.by_id.remove(id) {
            Some(deadline) => {
                self.by_deadline.remove(&(deadline, id.to_string()));
                true
            }
            None => false,
        }
    }
}

/// Counts since the last summary, for the periodic info line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Activity {
    pub open: usize,
    pub opened: u64,
    pub closed: u64,
    pub expired: u64,
}

#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Leases>>,
    ttl: Duration,
    changed: Arc<Notify>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Sessions {
            inner: Arc::new(Mutex::new(Leases::default())),
            ttl,
            changed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> Result<Lease, SessionError> {
        let now = Instant::now();
        let id = format!("{:032x}", rand::random::<u128>());
        {
            let mut leases = self.lock();
            leases.purge(now);
            if leases.by_id.len() >= MAX_OPEN_SESSIONS {
                return Err(SessionError::Full {
                    open: leases.by_id.len(),
                });
            }
            leases.insert(id.clone(), now + self.ttl);
            leases.opened += 1;
        }
        self.changed.notify_one();
        Ok(Lease {
            id,
            ttl: self.ttl.as_secs(),
        })
    }

    /// Extends a live lease; `None` when it is unknown or already expired.
    pub fn heartbeat(&self, id: &str) -> Option<Lease> {
        let now = Instant::now();
        let mut leases = self.lock();
        leases.purge(now);
        if !leases.by_id.contains_key(id) {
            return None;
        }
        leases.insert(id.to_string(), now + self.ttl);
        Some(Lease {
            id: id.to_string(),
            ttl: self.ttl.as_secs(),
        })
    }

    pub fn close(&self, id: &str) -> bool {
        let removed = {
            let mut leases = self.lock();
            let removed = leases.remove(id);
            if removed {
                leases.closed += 1;
            }
            removed
        };
        if removed {
            self.changed.notify_one();
        }
        removed
    }

    /// Live leases with their remaining seconds, by id; expired ones are dropped.
    pub fn list(&self) -> Vec<Lease> {
        let now = Instant::now();
        let mut leases = self.lock();
        leases.purge(now);
        let mut out: Vec<Lease> = leases
            .by_id
            .iter()
            .map(|(id, d)| Lease {
                id: id.clone(),
                ttl: (*d - now).as_secs(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn active(&self) -> usize {
        let mut leases = self.lock();
        leases.purge(Instant::now());
        leases.by_id.len()
    }

    /// What happened since the last call (the counters restart).
    pub(crate) fn take_activity(&self) -> Activity {
        let mut leases = self.lock();
        leases.purge(Instant::now());
        let a = Activity {
            open: leases.by_id.len(),
            opened: leases.opened,
            closed: leases.closed,
            expired: leases.expired,
        };
        (leases.opened, leases.closed, leases.expired) = (0, 0, 0);
        a
    }

    /// Logs one info line per `every` in which leases were opened, closed or expired (one
    /// debug line per open and close would flood an info log: 16 MB per 100,000 opens).
    pub(crate) async fn log_summaries(&self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let a = self.take_activity();
            if a.opened + a.closed + a.expired > 0 {
                tracing::info!(
                    open = a.open,
                    opened = a.opened,
                    closed = a.closed,
                    expired = a.expired,
                    period_s = every.as_secs(),
                    "session leases"
                );
            }
        }
    }

    /// Resolves when a lease is opened or closed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leases_expire_without_heartbeat_and_live_with_one() {
        let s = Sessions::new(Duration::from_secs(120));
        let a = s.open().unwrap();
        let b = s.open().unwrap();
        assert_eq!(s.active(), 2);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(s.heartbeat(&a.id).is_some());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            s.list().iter().map(|l| l.id.clone()).collect::<Vec<_>>(),
            vec![a.id.clone()]
        );
        assert!(
            s.heartbeat(&b.id).is_none(),
            "an expired lease cannot be revived"
        );
        assert!(s.close(&a.id));
        assert!(!s.close(&a.id));
        assert_eq!(s.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn opening_a_lease_wakes_the_loop() {
        let s = Sessions::new(Duration::from_secs(5));
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.changed().await })
        };
        tokio::task::yield_now().await;
        s.open().unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_refuses_past_the_limit_and_frees_on_close_or_expiry() {
        let s = Sessions::new(Duration::from_secs(10));
        let leases: Vec<Lease> = (0..MAX_OPEN_SESSIONS).map(|_| s.open().unwrap()).collect();
        assert_eq!(
            s.open(),
            Err(SessionError::Full {
                open: MAX_OPEN_SESSIONS
            })
        );
        assert!(s.close(&leases[0].id));
        assert!(s.open().is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(s.active(), 0);
        assert!(s.open().is_ok());
        let a = s.take_activity();
        assert_eq!(a.opened, MAX_OPEN_SESSIONS as u64 + 2);
        assert_eq!((a.closed, a.open), (1, 1));
        assert_eq!(a.expired, MAX_OPEN_SESSIONS as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_moves_the_deadline_without_duplicating_the_lease() {
        let s = Sessions::new(Duration::from_secs(10));
        let a = s.open().unwrap();
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(6)).await;
            assert!(s.heartbeat(&a.id).is_some());
        }
        assert_eq!(s.active(), 1);
        assert_eq!(s.lock().by_deadline.len(), 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(s.heartbeat(&a.id).is_none());
    }
}
