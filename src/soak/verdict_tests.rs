//! Each verdict detector on made-up input: it fires on what it is meant to catch, and only
//! on that. A detector that cannot fire would make every soak look clean.

use super::*;
use chrono::{TimeZone, Utc};

const T0: i64 = 1_000_000;

fn life(profile: &str, created_s: i64) -> TokenLife {
    TokenLife {
        token_id: format!("{profile}-{created_s}"),
        comment: format!("{SOAK_COMMENT}:x"),
        profile: profile.into(),
        created_ms: T0 + created_s * 1000,
        expires_ms: Some(T0 + (created_s + 20) * 1000),
        revoked_ms: None,
    }
}

fn record(id: &str, comment: &str, live: bool) -> TokenRecord {
    let at = |s: i64| Utc.timestamp_opt(s, 0).single().unwrap_or_default();
    TokenRecord {
        token_id: id.into(),
        comment: comment.into(),
        created_at: at(100),
        expires_at: Some(at(if live { 10_000 } else { 150 })),
        revoked_at: None,
        oauth: false,
        family: None,
    }
}

#[test]
fn a_gap_in_one_profile_is_not_hidden_by_the_neighbours_rotations() {
    // DEFAULT rotates at 0, 10, then nothing for 40 s; the neighbour keeps rotating.
    let mut tokens: Vec<TokenLife> = [0, 10, 50, 60]
        .iter()
        .map(|s| life("DEFAULT", *s))
        .collect();
    tokens.extend((0..7).map(|i| life(NEIGHBOUR_PROFILE, i * 9 + 5)));
    let found = missed_rotations(
        20,
        &tokens,
        &["DEFAULT", NEIGHBOUR_PROFILE],
        T0,
        T0 + 65_000,
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "missed_rotation");
    assert_eq!(found[0].at_ms, T0 + 50_000);
    assert!(
        found[0].detail.contains("profile DEFAULT"),
        "{}",
        found[0].detail
    );
    // Judged as one pool (the old detector), the neighbour's tokens fill the gap.
    let pooled: Vec<TokenLife> = tokens
        .iter()
        .map(|t| TokenLife {
            profile: "DEFAULT".into(),
            ..t.clone()
        })
        .collect();
    assert!(missed_rotations(20, &pooled, &["DEFAULT"], T0, T0 + 65_000).is_empty());
}

#[test]
fn a_profile_that_never_rotated_and_a_gap_before_the_end_are_missed_rotations() {
    let tokens: Vec<TokenLife> = [0, 15, 30].iter().map(|s| life("DEFAULT", *s)).collect();
    let found = missed_rotations(
        20,
        &tokens,
        &["DEFAULT", NEIGHBOUR_PROFILE],
        T0,
        T0 + 60_000,
    );
    let details: Vec<&str> = found.iter().map(|v| v.detail.as_str()).collect();
    assert_eq!(found.len(), 2, "{details:?}");
    assert!(details
        .iter()
        .any(|d| d.contains("30.0 s") && d.contains("DEFAULT")));
    assert!(details
        .iter()
        .any(|d| d.contains("60.0 s") && d.contains(NEIGHBOUR_PROFILE)));
    // Rotations within the lifetime, to the end: nothing.
    assert!(missed_rotations(20, &tokens, &["DEFAULT"], T0, T0 + 45_000).is_empty());
}

#[test]
fn a_live_token_neither_current_nor_pending_is_a_leak() {
    let now = Utc.timestamp_opt(1_000, 0).single().unwrap_or_default();
    let tokens = [
        record("current", &format!("{SOAK_COMMENT}:soak-0"), true),
        record("pending", &format!("{SOAK_COMMENT}:soak-1"), true),
        record("leaked", &format!("{SOAK_COMMENT}:soak-1"), true),
        record("expired", &format!("{SOAK_COMMENT}:soak-1"), false),
        record("users-own", "notebook", true),
    ];
    let keep = ["current".to_string(), "pending".to_string()];
    let found = leaked_tokens(&tokens, &keep, now);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "leaked_token");
    assert!(found[0].detail.contains("leaked"));
}

#[test]
fn every_request_with_a_dead_token_is_a_violation_of_its_kind() {
    let at = Utc.timestamp_opt(2_000, 0).single().unwrap_or_default();
    let event = |kind: &str| DeadTokenEvent {
        at,
        kind: kind.into(),
        token_id: "t1".into(),
        path: "/api/2.0/clusters/list".into(),
        user_agent: "reader".into(),
    };
    let found = dead_token_requests(&[event("revoked"), event("expired")]);
    let kinds: Vec<&str> = found.iter().map(|v| v.kind.as_str()).collect();
    assert_eq!(kinds, ["revoked_token_request", "expired_token_request"]);
    assert!(dead_token_requests(&[]).is_empty());
}

#[test]
fn a_replayed_refresh_token_and_a_revoked_login_are_violations() {
    let clean = OAuthCounters {
        refreshes: 40,
        ..OAuthCounters::default()
    };
    assert!(replayed_refresh_tokens(&clean, 0).is_empty());
    let replayed = OAuthCounters {
        replays: 1,
        family_revocations: 1,
        ..clean
    };
    let kinds: Vec<String> = replayed_refresh_tokens(&replayed, 0)
        .into_iter()
        .map(|v| v.kind)
        .collect();
    assert_eq!(kinds, ["refresh_token_replayed", "login_revoked"]);
}

#[test]
fn a_read_refused_with_403_is_a_violation_and_other_statuses_are_not() {
    let line = |status: u16| ReaderLine {
        t: T0,
        reader: 3,
        fp: Some("fp".into()),
        status,
        bench: None,
        mode: None,
    };
    let found = refused_reads(&[line(200), line(0), line(403), line(503)]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].kind, "reader_403");
    assert!(found[0].detail.contains("reader 3"));
}

#[test]
fn a_revoked_token_is_allowed_only_until_the_detection_bound() {
    let revoked = [Revoked {
        token_id: "t9".into(),
        fingerprint: "sha256:t9".into(),
        at_ms: T0,
    }];
    let line = |t: i64, fp: Option<&str>, mode: Option<ReadMode>| ReaderLine {
        t: T0 + t,
        reader: 1,
        fp: fp.map(str::to_string),
        status: 403,
        bench: None,
        mode,
    };
    let allows = |l: &ReaderLine| {
        let theirs = |r: &Revoked| {
            l.mode == Some(ReadMode::Proxy) || l.fp.as_deref() == Some(r.fingerprint.as_str())
        };
        revocation_allows(&revoked, theirs, l.t, 14_000)
    };
    assert!(allows(&line(500, Some("sha256:t9"), Some(ReadMode::File))));
    assert!(allows(&line(13_000, None, Some(ReadMode::Proxy))));
    // Past the bound, before the revocation, or another token: violations.
    assert!(!allows(&line(
        14_500,
        Some("sha256:t9"),
        Some(ReadMode::File)
    )));
    assert!(!allows(&line(
        -100,
        Some("sha256:t9"),
        Some(ReadMode::File)
    )));
    assert!(!allows(&line(
        500,
        Some("sha256:other"),
        Some(ReadMode::Metadata)
    )));
    let allowed = [line(500, Some("sha256:t9"), None), line(2_300, None, None)];
    let found = revocations_found(&revoked, &allowed, 14_000);
    assert!(found[0].label.contains("for 2.3 s"), "{}", found[0].label);
}
