//! The rotation policy: when to rotate and when to wake up next.
//!
//! Pure code: no I/O, no clock reads. The loop passes `now`, the recorded state, the
//! configuration and the number of active sessions, and gets a [`Plan`]. The invariant it
//! keeps is the one the idle-deadlock incident broke: a token is replaced before its
//! remaining lifetime drops below the threshold, whatever the sessions are doing, and the
//! next wake-up is never later than `expires_at - threshold`.
//!
//! [`converge`] is the loop's whole decision, level-triggered: from what is true this turn
//! (the file's token and its times, whether the provider called it dead, the live token the
//! rotator holds in memory) it says what restores the invariant, never from which event
//! woke the loop. It guards the second family of incidents: a file truncated under a live
//! rotator, a token revoked out of band and served until the next forced window, a minted
//! token abandoned because a foreign lock blocked its write, a shorter grant than asked
//! refused until the current token died.

use chrono::{DateTime, TimeDelta, Utc};

/// The longest the forced window may open before expiry, whatever the interval.
pub(crate) const MAX_THRESHOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// `threshold = min(PAT_ROTATION_INTERVAL, 60 s)`: below this remaining lifetime a rotation
/// is forced. The one place the formula is written.
pub fn threshold(interval: std::time::Duration) -> std::time::Duration {
    interval.min(MAX_THRESHOLD)
}

/// The parts of the configuration the policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PolicyConfig {
    pub interval: TimeDelta,
    pub threshold: TimeDelta,
    pub skip_when_idle: bool,
}

impl PolicyConfig {
    pub fn new(interval: TimeDelta, skip_when_idle: bool) -> Self {
        PolicyConfig {
            interval,
            threshold: TimeDelta::from_std(threshold(interval.to_std().unwrap_or_default()))
                .unwrap_or(interval),
            skip_when_idle,
        }
    }
}

/// What is known about the token on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTimes {
    pub expires_at: DateTime<Utc>,
    pub rotated_at: DateTime<Utc>,
    /// The lifetime the provider granted, when recorded: a grant shorter than twice the
    /// threshold moves the forced window to half the grant ([`forced_window`]).
    pub granted: Option<TimeDelta>,
}

/// How long before expiry a token's forced window opens: the threshold, or half the
/// lifetime the provider granted when that is less (a workspace that grants 5 s of the 20
/// asked for gets its tokens replaced at 2.5 s left rather than refused or left to die).
pub(crate) fn forced_window(threshold: TimeDelta, times: &TokenTimes) -> TimeDelta {
    match times.granted {
        Some(granted) if granted > TimeDelta::zero() => threshold.min(granted / 2),
        _ => threshold,
    }
}

/// Why a rotation happens. `as_str` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RotateReason {
    /// Remaining lifetime at or below the threshold: rotates regardless of sessions.
    ForcedNearExpiry,
    /// The interval elapsed while sessions were active (or idle-skipping is off).
    Interval,
    /// No state, or state that describes another token: the expiry is unknown.
    UnknownExpiry,
    /// An operator asked for it (`once --force`).
    Manual,
    /// The provider rejected the token on disk (revoked out of band, or its user lost the
    /// right to use tokens): replace it with another live credential now.
    Revoked,
}

impl RotateReason {
    /// Whether the token on disk cannot wait for another rotator that stopped making
    /// progress: near expiry, dead, or of unknown expiry.
    pub(crate) fn cannot_wait(self) -> bool {
        matches!(
            self,
            RotateReason::ForcedNearExpiry | RotateReason::Revoked | RotateReason::UnknownExpiry
        )
    }

    pub(crate) const ALL: [RotateReason; 5] = [
        RotateReason::ForcedNearExpiry,
        RotateReason::Interval,
        RotateReason::UnknownExpiry,
        RotateReason::Manual,
        RotateReason::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RotateReason::ForcedNearExpiry => "forced_near_expiry",
            RotateReason::Interval => "interval",
            RotateReason::UnknownExpiry => "unknown_expiry",
            RotateReason::Manual => "manual",
            RotateReason::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SkipReason {
    /// The interval has not elapsed and the token is far from expiry.
    NotDue,
    /// The interval elapsed, but no session is active and idle-skipping is on.
    Idle,
}

impl SkipReason {
    pub(crate) const ALL: [SkipReason; 2] = [SkipReason::NotDue, SkipReason::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotDue => "not_due",
            SkipReason::Idle => "idle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    Rotate(RotateReason),
    Skip(SkipReason),
    /// Write the live token the rotator holds back into the file: the file lost its token,
    /// holds a dead one, or holds one in its forced window that the held one outlives (a
    /// write that a foreign lock blocked). No mint.
    Restore,
}

impl Decision {
    /// `rotate:<reason>` or `skip:<reason>`, with the metric label names.
    pub fn label(self) -> String {
        match self {
            Decision::Rotate(r) => format!("rotate:{}", r.as_str()),
            Decision::Skip(r) => format!("skip:{}", r.as_str()),
            Decision::Restore => "restore".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub decision: Decision,
    /// When to decide again. For a rotation this is `now`: rotate, then plan again.
    pub next_wake: DateTime<Utc>,
}

/// The decision. Forced rotation uses "at or below the threshold" so that waking exactly at
/// `expires_at - threshold` (the wake-up this function asks for) rotates instead of asking
/// to be woken again at the same instant.
pub(crate) fn decide(
    now: DateTime<Utc>,
    state: Option<TokenTimes>,
    cfg: &PolicyConfig,
    active_sessions: usize,
) -> Plan {
    let rotate = |reason| Plan {
        decision: Decision::Rotate(reason),
        next_wake: now,
    };
    let Some(times) = state else {
        return rotate(RotateReason::UnknownExpiry);
    };
    let forced_at = times.expires_at - forced_window(cfg.threshold, &times);
    if now >= forced_at {
        return rotate(RotateReason::ForcedNearExpiry);
    }
    let interval_at = times.rotated_at + cfg.interval;
    let busy = active_sessions > 0 || !cfg.skip_when_idle;
    if now >= interval_at {
        if busy {
            return rotate(RotateReason::Interval);
        }
        // Idle: only the forced window is left to wake for (a new session wakes the loop).
        return Plan {
            decision: Decision::Skip(SkipReason::Idle),
            next_wake: forced_at,
        };
    }
    Plan {
        decision: Decision::Skip(SkipReason::NotDue),
        next_wake: interval_at.min(forced_at),
    }
}

/// What one turn of the loop observed: everything [`converge`] decides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observation {
    pub now: DateTime<Utc>,
    /// The config file holds a token for the profile.
    pub file_has_token: bool,
    /// Its times, when the state describes it (the earlier of wall and monotonic expiry).
    pub file_times: Option<TokenTimes>,
    /// The provider said the file's token is invalid (to the rotator, or through the proxy).
    pub file_token_dead: bool,
    /// The live credential the rotator holds in memory, when it is not the file's token (a
    /// token it wrote and then lost from the file, or minted and could not write): its times.
    pub held: Option<TokenTimes>,
    /// The held token was minted to replace the file's token (its write was blocked).
    pub held_replaces_file: bool,
    pub active_sessions: usize,
}

/// The loop's decision from what is true now:
/// - on the file alone: a dead token is replaced now ([`RotateReason::Revoked`]), anything
///   else as [`decide`] says;
/// - but a held token out of its own forced window is written instead of a mint
///   ([`Decision::Restore`]) when the file has no token or a dead one, or when the file's
///   token is the one the held token was minted to replace, is due for rotation, and the
///   held one outlives it; any other token somebody else wrote is newer than ours and is
///   never overwritten.
pub(crate) fn converge(obs: &Observation, cfg: &PolicyConfig) -> Plan {
    let now = obs.now;
    let on_file = if obs.file_has_token && obs.file_token_dead {
        Plan {
            decision: Decision::Rotate(RotateReason::Revoked),
            next_wake: now,
        }
    } else {
        decide(now, obs.file_times, cfg, obs.active_sessions)
    };
    let in_window = |t: &TokenTimes| now >= t.expires_at - forced_window(cfg.threshold, t);
    if let Some(held) = obs.held.filter(|h| !in_window(h)) {
        let file_lost = !obs.file_has_token || obs.file_token_dead;
        let held_better = match obs.file_times {
            _ if file_lost => true,
            // Only the token it was minted to replace: two rotators holding different
            // tokens (their clocks judging each other's expiry differently) must not take
            // turns overwriting each other; the simulation found that.
            Some(file) => {
                obs.held_replaces_file
                    && matches!(on_file.decision, Decision::Rotate(_))
                    && held.expires_at > file.expires_at
            }
            None => false,
        };
        if held_better {
            return Plan {
                decision: Decision::Restore,
                next_wake: now,
            };
        }
    }
    on_file
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }
    fn s(secs: i64) -> TimeDelta {
        TimeDelta::seconds(secs)
    }
    fn times(rotated: i64, lifetime: i64) -> Option<TokenTimes> {
        Some(TokenTimes {
            rotated_at: t(rotated),
            expires_at: t(rotated + lifetime),
            granted: None,
        })
    }
    const DEFAULTS: PolicyConfig = PolicyConfig {
        interval: TimeDelta::seconds(600),
        threshold: TimeDelta::seconds(60),
        skip_when_idle: true,
    };

    #[test]
    fn unknown_state_rotates_now() {
        let p = decide(t(0), None, &DEFAULTS, 0);
        assert_eq!(p.decision, Decision::Rotate(RotateReason::UnknownExpiry));
        assert_eq!(p.next_wake, t(0));
    }

    #[test]
    fn fresh_token_sleeps_until_the_interval_tick() {
        let p = decide(t(10), times(0, 900), &DEFAULTS, 1);
        assert_eq!(p.decision, Decision::Skip(SkipReason::NotDue));
        assert_eq!(p.next_wake, t(600));
    }

    #[test]
    fn interval_elapsed_with_sessions_rotates() {
        let p = decide(t(600), times(0, 900), &DEFAULTS, 1);
        assert_eq!(p.decision, Decision::Rotate(RotateReason::Interval));
    }

    #[test]
    fn interval_elapsed_with_zero_sessions_skips_but_wakes_for_the_forced_window() {
        let p = decide(t(600), times(0, 900), &DEFAULTS, 0);
        assert_eq!(p.decision, Decision::Skip(SkipReason::Idle));
        assert_eq!(p.next_wake, t(840));
    }

    #[test]
    fn interval_elapsed_idle_with_skipping_off_rotates() {
        let cfg = PolicyConfig {
            skip_when_idle: false,
            ..DEFAULTS
        };
        assert_eq!(
            decide(t(600), times(0, 900), &cfg, 0).decision,
            Decision::Rotate(RotateReason::Interval)
        );
    }

    #[test]
    fn one_second_before_the_threshold_skips_and_at_the_threshold_forces() {
        let p = decide(t(839), times(0, 900), &DEFAULTS, 0);
        assert_eq!(p.decision, Decision::Skip(SkipReason::Idle));
        assert_eq!(p.next_wake, t(840));
        assert_eq!(
            decide(t(840), times(0, 900), &DEFAULTS, 0).decision,
            Decision::Rotate(RotateReason::ForcedNearExpiry)
        );
    }

    #[test]
    fn near_expiry_rotates_regardless_of_sessions() {
        for sessions in [0, 1, 5] {
            let p = decide(t(850), times(0, 900), &DEFAULTS, sessions);
            assert_eq!(p.decision, Decision::Rotate(RotateReason::ForcedNearExpiry));
        }
    }

    #[test]
    fn expired_token_is_forced() {
        assert_eq!(
            decide(t(5000), times(0, 900), &DEFAULTS, 0).decision,
            Decision::Rotate(RotateReason::ForcedNearExpiry)
        );
    }

    #[test]
    fn forced_window_earlier_than_interval_tick_wins() {
        // lifetime 90, interval 60: threshold 60, so the forced window opens at age 30.
        let cfg = PolicyConfig::new(s(60), true);
        let p = decide(t(1), times(0, 90), &cfg, 1);
        assert_eq!(p.next_wake, t(30));
    }

    #[test]
    fn compressed_settings_threshold_is_the_interval() {
        let cfg = PolicyConfig::new(s(4), true);
        assert_eq!(cfg.threshold, s(4));
        assert_eq!(
            decide(t(4), times(0, 8), &cfg, 0).decision,
            Decision::Rotate(RotateReason::ForcedNearExpiry)
        );
    }

    /// A token issued by the simulated provider: it rejects a mint made with an expired token.
    #[derive(Clone, Copy)]
    struct SimToken {
        expires_at: DateTime<Utc>,
        rotated_at: DateTime<Utc>,
    }

    /// Drives a wake-up strategy over simulated time. Returns the number of successful rotations,
    /// or the time at which a mint was attempted with a dead token (the incident).
    fn simulate(
        lifetime: i64,
        horizon: i64,
        sessions_at: impl Fn(DateTime<Utc>) -> usize,
        mut step: impl FnMut(DateTime<Utc>, SimToken, usize) -> (bool, DateTime<Utc>),
    ) -> Result<usize, DateTime<Utc>> {
        let mut now = t(0);
        let mut tok = SimToken {
            expires_at: now + s(lifetime),
            rotated_at: now,
        };
        let mut rotations = 0;
        while now < t(horizon) {
            let (rotate, next) = step(now, tok, sessions_at(now));
            if rotate {
                if now >= tok.expires_at {
                    return Err(now);
                }
                tok = SimToken {
                    expires_at: now + s(lifetime),
                    rotated_at: now,
                };
                rotations += 1;
                continue;
            }
            now = next;
        }
        Ok(rotations)
    }

    /// The incident: lifetime 90 s, interval 60 s, nobody connected until a user returns at
    /// 100 s. The old algorithm wakes every interval, skips while idle and never looks at the
    /// expiry; the token dies at 90 s and its mint at 120 s uses a dead token.
    #[test]
    fn incident_replay_old_algorithm_dies_and_policy_survives() {
        let lifetime = 90;
        let user_returns = |now: DateTime<Utc>| usize::from(now >= t(100));
        let old = simulate(lifetime, 3600, user_returns, |now, tok, sessions| {
            let interval_elapsed = now - tok.rotated_at >= s(60);
            (interval_elapsed && sessions > 0, now + s(60))
        });
        assert_eq!(
            old,
            Err(t(120)),
            "the old algorithm must reproduce the incident"
        );

        let cfg = PolicyConfig::new(s(60), true);
        let new = simulate(lifetime, 3600, user_returns, |now, tok, sessions| {
            let plan = decide(
                now,
                Some(TokenTimes {
                    expires_at: tok.expires_at,
                    rotated_at: tok.rotated_at,
                    granted: None,
                }),
                &cfg,
                sessions,
            );
            (matches!(plan.decision, Decision::Rotate(_)), plan.next_wake)
        });
        // Forced at age 30 every time (30 s, 60 s, ... 3570 s), all with a live token.
        assert_eq!(new, Ok(119));
    }

    fn valid_config() -> impl Strategy<Value = (i64, PolicyConfig)> {
        (2i64..=7200, any::<bool>()).prop_flat_map(|(lifetime, skip)| {
            (Just(lifetime), 1i64..lifetime).prop_map(move |(lifetime, interval)| {
                (lifetime, PolicyConfig::new(s(interval), skip))
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// For any valid configuration and any session pattern over hours of simulated time,
        /// driving the policy only at the wake-ups it asks for (and at session changes, which wake
        /// the loop) rotates before the remaining lifetime falls below threshold - 1 s, and never
        /// asks to wake twice within a second unless a rotation is due.
        #[test]
        fn never_lets_a_token_into_its_last_window(
            (lifetime, cfg) in valid_config(),
            changes in prop::collection::vec((1i64..3600, 0usize..3), 0..40),
            horizon_hours in 1i64..6,
        ) {
            let horizon = horizon_hours * 3600;
            let mut change_times: Vec<(DateTime<Utc>, usize)> = changes.iter().map(|(at, n)| (t(*at * horizon_hours), *n)).collect();
            change_times.sort_by_key(|(at, _)| *at);
            let sessions_at = |now: DateTime<Utc>| change_times.iter().rev().find(|(at, _)| *at <= now).map(|(_, n)| *n).unwrap_or(0);

            let mut now = t(0);
            let mut tok = TokenTimes { expires_at: now + s(lifetime), rotated_at: now, granted: None };
            let mut last_skip_wake: Option<DateTime<Utc>> = None;
            while now < t(horizon) {
                let plan = decide(now, Some(tok), &cfg, sessions_at(now));
                match plan.decision {
                    Decision::Restore => prop_assert!(false, "decide never restores"),
                    Decision::Rotate(_) => {
                        prop_assert!(tok.expires_at - now >= cfg.threshold - s(1),
                            "rotated with {}s left, threshold {}s", (tok.expires_at - now).num_seconds(), cfg.threshold.num_seconds());
                        tok = TokenTimes { expires_at: now + s(lifetime), rotated_at: now, granted: None };
                        last_skip_wake = None;
                    }
                    Decision::Skip(_) => {
                        prop_assert!(plan.next_wake > now);
                        prop_assert!(plan.next_wake <= tok.expires_at - cfg.threshold);
                        if let Some(prev) = last_skip_wake {
                            // Two skips in a row less than a second apart only when the next
                            // wake-up is the forced window itself.
                            prop_assert!(now - prev >= s(1) || plan.next_wake == tok.expires_at - cfg.threshold);
                        }
                        last_skip_wake = Some(now);
                        // The loop also wakes when sessions change.
                        let next_change = change_times.iter().map(|(at, _)| *at).find(|at| *at > now);
                        now = match next_change { Some(c) if c < plan.next_wake => c, _ => plan.next_wake };
                    }
                }
            }
        }
    }

    fn obs(now: i64) -> Observation {
        Observation {
            now: t(now),
            file_has_token: true,
            file_times: times(0, 900),
            file_token_dead: false,
            held: None,
            held_replaces_file: false,
            active_sessions: 0,
        }
    }

    /// N2: a config file truncated to 0 bytes (or a directory recreated) under a rotator
    /// that holds the live token it minted 4 s earlier: the token goes back, nothing is
    /// minted, instead of "no token to authenticate with" for good.
    #[test]
    fn a_file_that_lost_its_token_gets_the_held_one_back() {
        let o = Observation {
            file_has_token: false,
            file_times: None,
            held: times(0, 900),
            ..obs(4)
        };
        assert_eq!(converge(&o, &DEFAULTS).decision, Decision::Restore);
        // Nothing held: a rotation with whatever credential is left.
        let o = Observation { held: None, ..o };
        assert_eq!(
            converge(&o, &DEFAULTS).decision,
            Decision::Rotate(RotateReason::UnknownExpiry)
        );
    }

    /// N1: a token revoked out of band is replaced at once, not at the next forced window.
    #[test]
    fn a_dead_file_token_is_replaced_now() {
        let o = Observation {
            file_token_dead: true,
            ..obs(10)
        };
        assert_eq!(
            converge(&o, &DEFAULTS).decision,
            Decision::Rotate(RotateReason::Revoked)
        );
        // ... by the held token when the rotator holds another live one.
        let o = Observation {
            held: times(5, 900),
            ..o
        };
        assert_eq!(converge(&o, &DEFAULTS).decision, Decision::Restore);
    }

    /// H2: a minted token whose write a foreign lock blocked is the credential of record:
    /// once the file's token is in its forced window, the held one is written, not a new mint.
    #[test]
    fn a_held_token_that_outlives_the_files_replaces_it_in_the_forced_window() {
        let o = Observation {
            held: times(845, 900),
            held_replaces_file: true,
            ..obs(850)
        };
        assert_eq!(converge(&o, &DEFAULTS).decision, Decision::Restore);
        // A token it was not minted to replace (another rotator's) is left to the policy.
        let other = Observation {
            held_replaces_file: false,
            ..o
        };
        assert_eq!(
            converge(&other, &DEFAULTS).decision,
            Decision::Rotate(RotateReason::ForcedNearExpiry)
        );
        // Before the file's window the file's token stays (nothing is due).
        let o = Observation {
            held: times(100, 900),
            ..obs(200)
        };
        assert_eq!(
            converge(&o, &DEFAULTS).decision,
            Decision::Skip(SkipReason::NotDue)
        );
    }

    /// A token somebody else wrote (a manual `set`, expiry unknown) is newer than ours: a
    /// resumed rotator never overwrites it with the one it holds.
    #[test]
    fn a_held_token_never_overwrites_a_token_of_unknown_expiry() {
        let o = Observation {
            file_times: None,
            held: times(0, 900),
            ..obs(10)
        };
        assert_eq!(
            converge(&o, &DEFAULTS).decision,
            Decision::Rotate(RotateReason::UnknownExpiry)
        );
    }

    /// N4: a provider that grants 5 s of the 20 asked (threshold 8): the token is kept and
    /// replaced at half its grant, instead of refused as too short (or rotated at once).
    #[test]
    fn a_shorter_grant_moves_the_forced_window_to_half_the_grant() {
        let cfg = PolicyConfig::new(s(8), true);
        let short_times = TokenTimes {
            rotated_at: t(0),
            expires_at: t(5),
            granted: Some(s(5)),
        };
        let short = Some(short_times);
        let p = decide(t(1), short, &cfg, 0);
        assert_eq!(p.decision, Decision::Skip(SkipReason::NotDue));
        assert_eq!(p.next_wake, t(2) + TimeDelta::milliseconds(500));
        assert_eq!(
            decide(t(3), short, &cfg, 0).decision,
            Decision::Rotate(RotateReason::ForcedNearExpiry)
        );
        // A full grant keeps the configured threshold.
        let full = Some(TokenTimes {
            granted: Some(s(20)),
            expires_at: t(20),
            ..short_times
        });
        assert_eq!(
            decide(t(12), full, &cfg, 0).decision,
            Decision::Rotate(RotateReason::ForcedNearExpiry)
        );
        assert_eq!(
            decide(t(11), full, &cfg, 0),
            Plan {
                decision: Decision::Skip(SkipReason::Idle),
                next_wake: t(12)
            }
        );
    }

    fn any_times() -> impl Strategy<Value = Option<TokenTimes>> {
        prop::option::of(
            (0i64..2000, 1i64..1000, prop::option::of(1i64..1000)).prop_map(
                |(rotated, lifetime, granted)| TokenTimes {
                    rotated_at: t(rotated),
                    expires_at: t(rotated + lifetime),
                    granted: granted.map(s),
                },
            ),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// From any observation: a file with no live token is never left as it is (restore
        /// or rotate now), a held token is restored only out of its own forced window and
        /// never over a token of unknown expiry, and a skip always wakes in the future.
        #[test]
        fn converge_never_leaves_the_file_without_a_live_token(
            now in 0i64..3000,
            file_has_token in any::<bool>(),
            file_times in any_times(),
            file_token_dead in any::<bool>(),
            held in any_times(),
            held_replaces_file in any::<bool>(),
            sessions in 0usize..3,
        ) {
            let o = Observation {
                now: t(now),
                file_has_token,
                file_times: file_times.filter(|_| file_has_token),
                file_token_dead: file_token_dead && file_has_token,
                held,
                held_replaces_file,
                active_sessions: sessions,
            };
            let plan = converge(&o, &DEFAULTS);
            let file_live = o.file_has_token && !o.file_token_dead
                && o.file_times.is_none_or(|f| f.expires_at > o.now);
            match plan.decision {
                Decision::Skip(_) => {
                    prop_assert!(file_live);
                    prop_assert!(plan.next_wake > o.now);
                }
                Decision::Restore => {
                    let h = o.held.unwrap();
                    prop_assert!(o.now < h.expires_at - forced_window(DEFAULTS.threshold, &h));
                    prop_assert!(!(o.file_has_token && !o.file_token_dead && o.file_times.is_none()));
                    // Over a live token: only the one it was minted to replace.
                    prop_assert!(!o.file_has_token || o.file_token_dead || o.held_replaces_file);
                }
                Decision::Rotate(_) => prop_assert_eq!(plan.next_wake, o.now),
            }
        }
    }
}
