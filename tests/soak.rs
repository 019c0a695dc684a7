//! Short soaks through the real binary: a clean setup gets a clean verdict, and a
//! deliberately broken one (no revoke grace, readers with a time-only cache) is caught.

mod common;

use std::process::Command;

fn soak(
    out: &std::path::Path,
    args: &[&str],
) -> (std::process::ExitStatus, serde_json::Value, String) {
    let output = Command::new(common::bin())
        .arg("soak")
        .arg("--out")
        .arg(out)
        .args(args)
        .env_remove("DATABRICKS_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap_or_default())
            .unwrap_or_else(|_| {
                panic!(
                    "no report.json; stdout: {stdout}\nstderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
    (output.status, report, stdout)
}

#[test]
fn a_short_soak_with_faults_and_kills_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clean");
    let (status, report, stdout) = soak(
        &out,
        &[
            "--duration",
            "40",
            "--lifetime",
            "20",
            "--interval",
            "6",
            "--phase",
            "10",
            "--kill-every",
            "9",
        ],
    );
    println!("{stdout}");
    assert!(
        status.success(),
        "verdict: {}\n{stdout}",
        report["violations"]
    );
    assert_eq!(report["verdict"], "clean");
    // At least one rotation per lifetime (20 s) in 40 s: a floor no load can break, since
    // fewer would have let a token die (which the verdict above reports).
    assert!(
        report["figures"]["rotations"].as_u64().unwrap() >= 2,
        "{stdout}"
    );
    assert!(report["figures"]["kills"].as_u64().unwrap() >= 1);
    assert!(report["figures"]["reads_ok"].as_u64().unwrap() > 100);
    for kind in ["file", "metadata", "proxy"] {
        assert!(
            report["figures"]["reads_ok_by_kind"][kind]
                .as_u64()
                .unwrap_or(0)
                > 10,
            "{kind} readers took no part: {}",
            report["figures"]
        );
    }
    assert!(report["faults"].as_array().unwrap().len() >= 2);
    let svg = std::fs::read_to_string(out.join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("forced near expiry"));
    // What the readers saw is on the picture: every kind, the neighbour's too, with reads.
    let rows = report["readers"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().filter_map(|r| r["label"].as_str()).collect();
    assert_eq!(
        labels,
        [
            "readers: file",
            "readers: metadata",
            "readers: proxy",
            "neighbour: file"
        ]
    );
    for row in rows {
        let ok: u64 = row["bins"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["ok"].as_u64())
            .sum();
        assert!(ok > 10, "{} drew no reads", row["label"]);
        assert!(
            svg.contains(&format!("{ok} reads, 0 403")),
            "{} has no count on the picture",
            row["label"]
        );
    }
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(
        summary.starts_with("soak: 40 s, file store, lifetime 20 s, interval 6 s"),
        "{summary}"
    );
    // The picture as a user looks at it: rendered to PNG by librsvg.
    let rsvg = Command::new("rsvg-convert")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if common::require_tool("rsvg-convert", rsvg) {
        let png = out.join("timeline.png");
        let status = Command::new("rsvg-convert")
            .arg("-o")
            .arg(&png)
            .arg(out.join("timeline.svg"))
            .status()
            .unwrap();
        assert!(status.success(), "librsvg could not render the picture");
        let bytes = std::fs::read(&png).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{} bytes",
            bytes.len()
        );
    }
}

/// A U2M login shared by two rotators under single-use refresh tokens whose replay revokes
/// the login, with faults and kills timed into refreshes: clean, no refresh token replayed.
#[test]
fn a_short_oauth_u2m_soak_is_clean_and_never_replays() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("u2m");
    let (status, report, stdout) = soak(
        &out,
        &[
            "--credential",
            "oauth-u2m",
            "--duration",
            "50",
            "--lifetime",
            "20",
            "--interval",
            "6",
            "--phase",
            "10",
            "--kill-every",
            "12",
        ],
    );
    println!("{stdout}");
    assert!(
        status.success(),
        "verdict: {}\n{stdout}",
        report["violations"]
    );
    let oauth = &report["figures"]["oauth"];
    assert!(oauth["refreshes"].as_u64().unwrap() >= 2, "{oauth}");
    assert_eq!(oauth["replays"], 0);
    assert_eq!(oauth["family_revocations"], 0);
    assert!(report["figures"]["reads_ok"].as_u64().unwrap() > 100);
    assert!(stdout.contains("credential oauth-u2m"), "{stdout}");
}

#[test]
fn a_broken_setting_is_caught_by_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("broken");
    // Revoke at once, and readers that cache the token for 8 s: the stale-read incident.
    let (status, report, stdout) = soak(
        &out,
        &[
            "--duration",
            "20",
            "--lifetime",
            "8",
            "--interval",
            "2",
            "--grace",
            "0",
            "--reader-cache",
            "8",
            "--no-faults",
            "--kill-every",
            "0",
        ],
    );
    println!("{stdout}");
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(report["verdict"], "VIOLATIONS");
    let kinds: Vec<String> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "reader_403"), "{kinds:?}");
    assert!(
        kinds.iter().any(|k| k == "revoked_token_request"),
        "{kinds:?}"
    );
    assert!(std::fs::read_to_string(out.join("timeline.svg"))
        .unwrap()
        .contains("#d00"));
}
