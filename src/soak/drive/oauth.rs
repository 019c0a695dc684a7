//! The soak's OAuth U2M steps: a `kill -9` timed into a refresh (the claimant, once its claim
//! is on disk and its request on the wire), and the watch on the login. A login lost to such
//! a kill is the documented outcome (ARCHITECTURE.md, "OAuth: a refresh token is sent
//! once"): it is shown, and the soak logs in again as an operator would. Any other lost login
//! is a violation.

use super::Driver;
use crate::emulator::Faults;
use crate::soak::now_ms;
use crate::soak::oauth::{log_in, login_state, SoakCredential};
use crate::soak::report::{Span, Violation};
use crate::soak::SoakError;
use std::time::{Duration, Instant};

impl Driver<'_> {
    /// The rotator sending a refresh within `within`, if one does: a one-request latency on
    /// the token endpoint keeps its request on the wire long enough to be caught.
    pub(super) async fn refresh_claimant(&mut self, within: Duration) -> Option<usize> {
        if self.opts.credential != SoakCredential::U2m || self.fault_ends.is_some() {
            return None;
        }
        let emu = self.rig.emulator.as_ref()?;
        emu.emulator.set_faults(Faults {
            latency_ms: 1500,
            latency_requests: Some(1),
            ..Faults::default()
        });
        let config = self.rig.profiles[0].0.clone();
        let pid = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            while start.elapsed() < within {
                if let (Some(pid), None) = login_state(&config) {
                    return Some(pid);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        })
        .await
        .ok()
        .flatten();
        emu.emulator.set_faults(Faults::default());
        let pid = pid?;
        self.rig
            .rotators
            .iter()
            .position(|r| r.child.as_ref().and_then(tokio::process::Child::id) == Some(pid))
    }

    /// Whether rotator `i`, about to be killed, holds the refresh claim: its login is then
    /// lost as documented.
    pub(super) fn note_claimant_kill(&mut self, i: usize) {
        if self.opts.credential != SoakCredential::U2m {
            return;
        }
        let pid = self.rig.rotators[i]
            .child
            .as_ref()
            .and_then(tokio::process::Child::id);
        if pid.is_some() && login_state(&self.rig.profiles[0].0).0 == pid {
            self.killed_mid_refresh = Some(Instant::now());
        }
    }

    /// A lost login: the documented outcome of a kill mid-refresh, or a violation; either
    /// way the soak logs in again so that the run goes on.
    pub(super) async fn watch_login(&mut self) -> Result<(), SoakError> {
        if self.opts.credential != SoakCredential::U2m {
            return Ok(());
        }
        let (_, lost) = login_state(&self.rig.profiles[0].0);
        let Some(why) = lost else {
            return Ok(());
        };
        let window = Duration::from_secs(self.opts.lifetime * 2);
        let documented = self
            .killed_mid_refresh
            .take()
            .is_some_and(|at| at.elapsed() < window)
            && why.contains("never recorded its answer");
        if documented {
            self.seen.kills.push(Span {
                start_ms: now_ms(),
                end_ms: now_ms(),
                label: "login lost as documented (kill -9 mid-refresh); logged in again".into(),
            });
            self.logins_lost_documented += 1;
        } else {
            self.seen.violations.push(Violation {
                at_ms: now_ms(),
                kind: "login_lost".into(),
                detail: why,
            });
        }
        let env = self.rig.rotators[0].env.clone();
        log_in(&self.rig.exe, &env).await
    }
}
