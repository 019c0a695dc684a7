//! Who may get a token: the control listener tried as another local user and as a web page
//! would try it (DNS rebinding, cross-origin requests), and the session lease cap.

mod common;

use common::{Fixture, Running};
use pat_rotator::emulator::Options;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

/// One raw HTTP/1.1 exchange, so a test controls every header (a browser's `Origin`, a
/// rebound `Host`) exactly. Returns the status and the whole response text.
fn raw_request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

fn body(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or("")
}

async fn start_rotator() -> Running {
    let fixture = Fixture::new(Options::default()).await;
    let env = fixture.rotator(60, 30, 2);
    fixture.start(env).await
}

#[tokio::test]
async fn the_token_is_served_only_under_the_capability_to_a_local_non_browser_client() {
    let r = start_rotator().await;
    let host = r.emu.url();
    let port = r.env.control;
    let url = r.env.published_metadata_url();
    let path = url
        .strip_prefix(&format!("http://127.0.0.1:{port}"))
        .unwrap()
        .to_string();
    let secret = path.split('/').nth(1).unwrap().to_string();
    assert!(secret.len() >= 32, "a random secret of at least 128 bits");
    let control_json =
        std::path::PathBuf::from(format!("{}.control.json", r.env.config_path().display()));
    let mode = std::fs::metadata(&control_json)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the URLs are as private as the token");

    let local = format!("127.0.0.1:{port}");
    let md = [
        ("X-Databricks-Metadata-Version", "1"),
        ("X-Databricks-Host", host.as_str()),
    ];
    let with = |host: &str, extra: &[(&str, &str)]| -> Vec<(String, String)> {
        let mut h = vec![("Host".to_string(), host.to_string())];
        h.extend(md.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        h.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        h
    };
    let send = |method: &str, p: &str, h: Vec<(String, String)>| {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        raw_request(port, method, p, &h)
    };

    // The owner, through the published URL, with each accepted Host form.
    for host in [
        local.clone(),
        "127.0.0.1".into(),
        format!("localhost:{port}"),
        "[::1]".into(),
    ] {
        let (code, resp) = send("GET", &path, with(&host, &[]));
        assert_eq!(code, 200, "Host {host}: {resp}");
        assert!(body(&resp).contains("access_token"));
        assert!(!resp.to_ascii_lowercase().contains("access-control-"));
    }

    // The old fixed path, a wrong secret of the same length, a missing one: the same 404.
    let (_, unknown) = send("GET", "/no/such/path", with(&local, &[]));
    let mut wrong = secret.clone().into_bytes();
    wrong[0] = if wrong[0] == b'a' { b'b' } else { b'a' };
    let wrong = String::from_utf8(wrong).unwrap();
    for p in [
        "/v1/databricks/token".to_string(),
        format!("/{wrong}/v1/databricks/token"),
        format!("/{}/v1/databricks/token", &secret[..secret.len() - 1]),
        "//v1/databricks/token".to_string(),
    ] {
        for method in ["GET", "POST"] {
            let (code, resp) = send(method, &p, with(&local, &[]));
            assert_eq!(code, 404, "{method} {p}: {resp}");
            assert_eq!(body(&resp), body(&unknown), "{method} {p}");
        }
    }

    // DNS rebinding and pages in a browser: refused on every route, the right secret included.
    let routes = [
        ("GET", path.clone()),
        ("POST", "/v1/sessions".to_string()),
        ("GET", "/v1/sessions".to_string()),
        ("POST", "/v1/sessions/abc/heartbeat".to_string()),
        ("DELETE", "/v1/sessions/abc".to_string()),
        ("GET", "/anything".to_string()),
    ];
    for (method, p) in &routes {
        for host in [
            "evil.example.com".to_string(),
            format!("evil.example.com:{port}"),
            format!("127.0.0.1:{}", port.wrapping_add(1)),
            "127.0.0.1.nip.io".to_string(),
        ] {
            let (code, resp) = send(method, p, with(&host, &[]));
            assert_eq!(code, 403, "{method} {p} with Host {host}: {resp}");
            assert!(!resp.contains("access_token"));
        }
        let (code, resp) = send(
            method,
            p,
            with(&local, &[("Origin", &format!("http://127.0.0.1:{port}"))]),
        );
        assert_eq!(code, 403, "{method} {p} with an Origin: {resp}");
        let (code, _) = send(method, p, with(&local, &[("Origin", "null")]));
        assert_eq!(code, 403, "{method} {p} with Origin: null");
        // A CORS preflight gets no CORS headers either.
        let (_, resp) = send(
            "OPTIONS",
            p,
            with(
                &local,
                &[
                    ("Origin", "http://evil.example.com"),
                    ("Access-Control-Request-Method", "GET"),
                ],
            ),
        );
        assert!(!resp.to_ascii_lowercase().contains("access-control-"));
        // Fetch metadata without Origin: a page's request all the same.
        for site in ["cross-site", "same-site"] {
            let (code, _) = send(method, p, with(&local, &[("Sec-Fetch-Site", site)]));
            assert_eq!(code, 403, "{method} {p} with Sec-Fetch-Site: {site}");
        }
        // Two Host headers: which one names us is ambiguous.
        let (code, resp) = send(method, p, with(&local, &[("Host", "evil.example.com")]));
        assert_eq!(code, 400, "{method} {p} with two Host headers: {resp}");
        assert!(!resp.contains("access_token"));
    }
    // An absolute-form target names another server: refused whatever the Host says.
    let (code, resp) = send(
        "GET",
        &format!("http://evil.example{path}"),
        with(&local, &[]),
    );
    assert_eq!(code, 400, "absolute-form target: {resp}");
    assert!(!resp.contains("access_token"));
    // A command-line client's own fetch metadata is fine.
    let (code, _) = send("GET", &path, with(&local, &[("Sec-Fetch-Site", "none")]));
    assert_eq!(code, 200);
}

#[tokio::test]
async fn session_leases_are_capped_with_429() {
    let r = start_rotator().await;
    let http = reqwest::Client::new();
    let url = r.env.control_url("/v1/sessions");
    let mut ids = Vec::new();
    for _ in 0..pat_rotator::sessions::MAX_OPEN_SESSIONS {
        let resp = http.post(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let lease: serde_json::Value = resp.json().await.unwrap();
        ids.push(lease["id"].as_str().unwrap().to_string());
    }
    // The listing gives the count, never an id (an id is the right to close a lease).
    let listing = http.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(
        !ids.iter().any(|id| listing.contains(id.as_str())),
        "the listing leaks lease ids"
    );
    let listed: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listed["active"], pat_rotator::sessions::MAX_OPEN_SESSIONS);
    let refused = http.post(&url).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let metrics = r.env.metrics().await;
    assert!(
        metrics.contains("pat_rotator_sessions_refused_total 1"),
        "the refusal is counted"
    );
    let why = refused.text().await.unwrap();
    assert!(why.contains("close unused"), "{why}");
    let closed = http
        .delete(r.env.control_url(&format!("/v1/sessions/{}", ids[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status().as_u16(), 204);
    assert_eq!(http.post(&url).send().await.unwrap().status().as_u16(), 201);
    // Opens and closes are logged at debug level (the log runs at info): 4,000 opens add no
    // line per lease (counted, not searched for by wording).
    let log = std::fs::read_to_string(r.dir.path().join("run.log")).unwrap();
    let lines = log.lines().count();
    assert!(
        lines < pat_rotator::sessions::MAX_OPEN_SESSIONS / 10,
        "{lines} log lines for {} leases",
        pat_rotator::sessions::MAX_OPEN_SESSIONS
    );
}

/// Child role: what another local user can try. Prints one line per attempt; the parent
/// checks that no attempt produced a token. Not a test of its own.
#[test]
#[ignore = "entry point for the child process another_local_user_gets_no_token_while_the_owner_does spawns"]
fn probe_as_another_user() {
    let Ok(args) = std::env::var("PAT_TEST_PROBE") else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&args).unwrap();
    let port = v["port"].as_u64().unwrap() as u16;
    let host = v["host"].as_str().unwrap();
    for file in v["files"].as_array().unwrap() {
        let f = file.as_str().unwrap();
        match std::fs::read_to_string(f) {
            Ok(text) => println!("READ {f}: {text}"),
            Err(e) => println!("DENIED {f}: {e}"),
        }
    }
    let local = format!("127.0.0.1:{port}");
    let guesses = [
        "/v1/databricks/token".to_string(),
        format!("/{}/v1/databricks/token", "0".repeat(64)),
        "/v1/sessions".to_string(),
        "/".to_string(),
    ];
    for p in guesses {
        let (code, resp) = raw_request(
            port,
            "GET",
            &p,
            &[
                ("Host", &local),
                ("X-Databricks-Metadata-Version", "1"),
                ("X-Databricks-Host", host),
            ],
        );
        println!("HTTP {code} {p}: {}", body(&resp));
    }
}

#[tokio::test]
async fn another_local_user_gets_no_token_while_the_owner_does() {
    if unsafe { libc::geteuid() } != 0 {
        let why = "SKIPPED: creating a second Unix user needs root; run the tests as root to check the local-user boundary";
        assert!(
            std::env::var_os("PAT_REQUIRE_ROOT").is_none(),
            "{why} (scripts/test.sh requires it)"
        );
        eprintln!("{why}");
        return;
    }
    let user = "pat-rotator-other";
    let exists = Command::new("id").arg("-u").arg(user).output().unwrap();
    if !exists.status.success() {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                user,
            ])
            .output()
            .expect("useradd is on the image");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (uid, gid) = (id("-u"), id("-g"));

    let r = start_rotator().await;
    let url = r.env.published_metadata_url();
    let owner = reqwest::Client::new()
        .get(&url)
        .header("X-Databricks-Metadata-Version", "1")
        .header("X-Databricks-Host", r.emu.url())
        .send()
        .await
        .unwrap();
    assert_eq!(owner.status().as_u16(), 200, "the owner gets the token");
    let answer: serde_json::Value = owner.json().await.unwrap();
    let token = answer["access_token"].as_str().unwrap().to_string();

    // The probe runs from a copy of this test binary in a directory anyone may enter (the
    // checkout may live under a private home directory).
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = shared.path().join("probe");
    std::fs::copy(std::env::current_exe().unwrap(), &probe).unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = r.env.config_path();
    let args = serde_json::json!({
        "port": r.env.control,
        "host": r.emu.url(),
        "files": [
            cfg.display().to_string(),
            format!("{}.control.json", cfg.display()),
            format!("{}.pat-rotator.json", cfg.display()),
        ],
    });
    use std::os::unix::process::CommandExt;
    let out = Command::new(&probe)
        .args([
            "--exact",
            "probe_as_another_user",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env("PAT_TEST_PROBE", args.to_string())
        .current_dir(shared.path())
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("HTTP 404 /v1/databricks/token"), "{stdout}");
    assert!(
        !stdout.contains("READ "),
        "another user read a private file:\n{stdout}"
    );
    assert!(
        !stdout.contains(&token),
        "another user got the token:\n{stdout}"
    );
    assert!(
        !stdout.contains(&url),
        "another user learned the capability URL:\n{stdout}"
    );
}
