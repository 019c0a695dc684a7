//! Session leases: how workloads tell the rotator they are active.
//!
//! Invariant: a lease counts as active only until its deadline (`PAT_SESSION_TTL` after
//! creation or the last heartbeat), so a client that crashed without saying goodbye cannot
//! pin the rotator busy. Opening a lease wakes the loop (an overdue interval rotation may now
//! be due); expiries need no wake-up, they only ever make rotation less urgent.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Lease {
    pub id: String,
    /// Seconds until it expires without a heartbeat.
    pub ttl: u64,
}

#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Instant>>>,
    ttl: Duration,
    changed: Arc<Notify>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Sessions {
            inner: Arc::new(Mutex::new(HashMap::new())),
            ttl,
            changed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> Lease {
        let id = format!("{:032x}", rand::random::<u128>());
        self.lock().insert(id.clone(), Instant::now() + self.ttl);
        self.changed.notify_one();
        Lease {
            id,
            ttl: self.ttl.as_secs(),
        }
    }

    /// Extends a live lease; `None` when it is unknown or already expired.
    pub fn heartbeat(&self, id: &str) -> Option<Lease> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(id) {
            Some(deadline) if *deadline > now => {
                *deadline = now + self.ttl;
                Some(Lease {
                    id: id.to_string(),
                    ttl: self.ttl.as_secs(),
                })
            }
            _ => {
                map.remove(id);
                None
            }
        }
    }

    pub fn close(&self, id: &str) -> bool {
        let removed = self.lock().remove(id).is_some();
        if removed {
            self.changed.notify_one();
        }
        removed
    }

    /// Live leases with their remaining seconds; expired ones are dropped.
    pub fn list(&self) -> Vec<Lease> {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, deadline| *deadline > now);
        let mut out: Vec<Lease> = map
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
        self.list().len()
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
        let a = s.open();
        let b = s.open();
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
        s.open();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
