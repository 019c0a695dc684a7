//! The credential store under real processes and real files: concurrent readers never see a
//! torn or stale token, kill -9 never tears the file, compare-before-swap never loses an
//! update, and a held lock makes a manual write fail with "credential busy".
//!
//! Child processes are this test binary re-run with `PAT_TEST_ROLE` set, entering through
//! `child_process_entry`.

mod common;

use pat_rotator::reader::Reader;
use pat_rotator::store::{Store, SwapOutcome};
use pat_rotator::Token;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

/// The arguments that make this test binary run only `child_process_entry`.
const CHILD_ARGS: [&str; 6] = [
    "--exact",
    "child_process_entry",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
    "-q",
];

/// This test binary as a child process in `role`, on the config file `cfg`.
fn role_command(role: &str, cfg: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(CHILD_ARGS)
        .env("PAT_TEST_ROLE", role)
        .env("PAT_TEST_CFG", cfg);
    c
}

fn spawn_role(role: &str, cfg: &Path, extra: &[(&str, String)]) -> Child {
    let mut c = role_command(role, cfg);
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in extra {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn seq_of(token: &Token) -> Option<u64> {
    token
        .expose()
        .strip_prefix("tok-")
        .and_then(|s| s.parse().ok())
}

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var(name).unwrap())
}

fn env_u64(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Child process roles. Not a test of its own: the other tests run it in child processes.
#[test]
#[ignore = "entry point for the child processes the other tests spawn"]
fn child_process_entry() {
    let Ok(role) = std::env::var("PAT_TEST_ROLE") else {
        return;
    };
    let cfg = env_path("PAT_TEST_CFG");
    let store = Store::open(&cfg, "DEFAULT").unwrap();
    match role.as_str() {
        // Replaces the token COUNT times, publishing each completed sequence number.
        "writer" => {
            let progress = env_path("PAT_TEST_PROGRESS");
            let mut prev = store.read().unwrap().token;
            for seq in 1..=env_u64("PAT_TEST_COUNT") {
                let next = Token::new(format!("tok-{seq:08}"));
                assert!(matches!(
                    store
                        .swap(prev.as_ref(), &next, None, WAIT, None, &chrono::Utc::now)
                        .unwrap(),
                    SwapOutcome::Swapped
                ));
                pat_rotator::store::atomic_write(&progress, seq.to_string().as_bytes()).unwrap();
                prev = Some(next);
            }
            std::fs::write(progress.with_extension("done"), b"done").unwrap();
        }
        // Reads until the writer is done; a read that starts after progress P must see >= P.
        "reader" => {
            let progress = env_path("PAT_TEST_PROGRESS");
            let done = progress.with_extension("done");
            let reader = Reader::new(&cfg, "DEFAULT").unwrap();
            let (mut reads, mut torn, mut stale) = (0u64, 0u64, 0u64);
            while !done.exists() {
                let published: u64 = std::fs::read_to_string(&progress)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                match reader.token() {
                    Ok(Some(t)) => match seq_of(&t) {
                        Some(seq) if seq >= published => {}
                        Some(_) => stale += 1,
                        None => torn += 1,
                    },
                    Ok(None) if published == 0 => {}
                    _ => torn += 1,
                }
                reads += 1;
            }
            println!("RESULT {reads} {torn} {stale}");
        }
        // Rewrites the token as fast as it can until killed.
        "crash_writer" => {
            let mut seq = env_u64("PAT_TEST_START");
            loop {
                let prev = store.read().unwrap().token;
                seq += 1;
                let _ = store.swap(
                    prev.as_ref(),
                    &Token::new(format!("tok-{seq:08}")),
                    None,
                    WAIT,
                    None,
                    &chrono::Utc::now,
                );
            }
        }
        // Races another writer: read, then swap from what it read; prints each win.
        "race_writer" => {
            let id = env_u64("PAT_TEST_ID");
            let mut out = std::io::stdout().lock();
            for i in 0..env_u64("PAT_TEST_COUNT") {
                let seen = store.read().unwrap().token;
                let mine = Token::new(format!("w{id}-{i}"));
                if let SwapOutcome::Swapped = store
                    .swap(seen.as_ref(), &mine, None, WAIT, None, &chrono::Utc::now)
                    .unwrap()
                {
                    writeln!(
                        out,
                        "WIN {} {}",
                        seen.map(|t| t.expose().to_string()).unwrap_or_default(),
                        mine.expose()
                    )
                    .unwrap();
                }
            }
        }
        // Holds the write lock until stdin closes.
        "lock_holder" => {
            store
                .with_write_lock(WAIT, || {
                    println!("LOCKED");
                    std::io::stdout().flush().unwrap();
                    let mut sink = String::new();
                    let _ = std::io::stdin().read_line(&mut sink);
                    Ok(())
                })
                .unwrap();
        }
        // In a private mount namespace, with the config on a 16 KiB tmpfs: a swap with one
        // free page left, then with none.
        "tiny_disk" => {
            let dir = cfg.parent().unwrap();
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(mounted.success(), "mount tmpfs");
            let store = Store::open(&cfg, "DEFAULT").unwrap();
            let w = Duration::from_secs(2);
            let now = &chrono::Utc::now;
            let r = pat_rotator::store::Rotation::new("id-a", chrono::Utc::now(), "t");
            store
                .swap(
                    None,
                    &Token::new("tok-a"),
                    Some("https://h"),
                    w,
                    Some(&r),
                    now,
                )
                .unwrap();
            // Fill the disk, then give one page back.
            let fill = dir.join("fill");
            let _ = std::fs::write(&fill, vec![0u8; 64 * 1024]);
            let len = std::fs::metadata(&fill).unwrap().len();
            std::fs::write(&fill, vec![0u8; len.saturating_sub(4096) as usize]).unwrap();
            println!("ONE_PAGE check={:?}", store.check_writable().is_ok());
            let r = pat_rotator::store::Rotation::new("id-b", chrono::Utc::now(), "t");
            let swapped = store.swap(
                Some(&Token::new("tok-a")),
                &Token::new("tok-b"),
                None,
                w,
                Some(&r),
                now,
            );
            println!("ONE_PAGE swap={:?}", swapped.is_ok());
            let _ = std::fs::write(dir.join("fill2"), vec![0u8; 64 * 1024]);
            println!("FULL check={:?}", store.check_writable().is_ok());
            println!(
                "TOKEN {:?}",
                store.read().unwrap().token.map(|t| t.expose().to_string())
            );
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn readers_never_see_a_torn_or_stale_token_while_a_writer_replaces_it_thousands_of_times() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    std::fs::write(
        &cfg,
        "# shared\n[other]\ntoken = keep\n\n[DEFAULT]\ntoken = tok-00000000\n",
    )
    .unwrap();
    let progress = dir.path().join("progress");
    let readers: Vec<Child> = (0..4)
        .map(|_| {
            spawn_role(
                "reader",
                &cfg,
                &[("PAT_TEST_PROGRESS", progress.display().to_string())],
            )
        })
        .collect();
    let mut writer = spawn_role(
        "writer",
        &cfg,
        &[
            ("PAT_TEST_PROGRESS", progress.display().to_string()),
            ("PAT_TEST_COUNT", "2000".into()),
        ],
    );
    assert!(writer.wait().unwrap().success());
    let mut total = 0;
    for r in readers {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .unwrap_or_else(|| panic!("no result in {text}"));
        let n: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(
            (n[1], n[2]),
            (0, 0),
            "torn and stale reads out of {} reads",
            n[0]
        );
        assert!(n[0] > 0);
        total += n[0];
    }
    assert!(total > 100, "readers made only {total} reads");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert_eq!(
        text,
        "# shared\n[other]\ntoken = keep\n\n[DEFAULT]\ntoken = tok-00002000\n"
    );
}

#[test]
fn kill_minus_nine_at_random_moments_never_tears_the_file_or_piles_up_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    std::fs::write(&cfg, "[DEFAULT]\nhost = https://h\ntoken = tok-00000000\n").unwrap();
    let store = Store::open(&cfg, "DEFAULT").unwrap();
    // Rounds in which the killed writer had replaced the token: without any, nothing here
    // would show a kill landing mid-write (the starting file passes every check).
    let mut rounds_that_wrote = 0;
    for round in 0..30u64 {
        let mut child = spawn_role(
            "crash_writer",
            &cfg,
            &[("PAT_TEST_START", (round * 1_000_000).to_string())],
        );
        std::thread::sleep(Duration::from_millis(20 + rand_ms(round) % 60));
        common::sigkill(&mut child);
        let text = std::fs::read_to_string(&cfg).unwrap();
        let token = pat_rotator::ini::get_value(&text, "DEFAULT", "token")
            .unwrap()
            .unwrap();
        assert!(
            token.starts_with("tok-") && token.len() == 12,
            "round {round}: torn token {token:?}"
        );
        // This round's writer numbers its tokens from round * 1,000,000 + 1.
        if token[4..]
            .parse::<u64>()
            .is_ok_and(|seq| seq > round * 1_000_000)
        {
            rounds_that_wrote += 1;
        }
        assert!(
            text.starts_with("[DEFAULT]\nhost = https://h\ntoken = tok-") && text.ends_with('\n'),
            "round {round}: {text:?}"
        );
        let temps = temp_files(dir.path());
        assert!(temps <= 2, "round {round}: {temps} temp files");
    }
    assert!(
        rounds_that_wrote > 0,
        "no killed writer ever replaced the token: the kills proved nothing"
    );
    println!("{rounds_that_wrote} of 30 killed writers had replaced the token");
    // The next write cleans up whatever a crash left.
    let current = store.read().unwrap().token;
    store
        .swap(
            current.as_ref(),
            &Token::new("tok-final000"),
            None,
            WAIT,
            None,
            &chrono::Utc::now,
        )
        .unwrap();
    let temps = temp_files(dir.path());
    assert_eq!(temps, 0);
}

/// Temp files a writer left in `dir`.
fn temp_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count()
}

fn rand_ms(seed: u64) -> u64 {
    // A cheap deterministic spread of kill moments.
    seed.wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        >> 33
}

#[test]
fn two_writers_racing_with_compare_before_swap_never_lose_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    std::fs::write(&cfg, "[DEFAULT]\ntoken = start\n").unwrap();
    let writers: Vec<Child> = (1..=2)
        .map(|id| {
            spawn_role(
                "race_writer",
                &cfg,
                &[
                    ("PAT_TEST_ID", id.to_string()),
                    ("PAT_TEST_COUNT", "300".into()),
                ],
            )
        })
        .collect();
    let mut wins: Vec<(String, String)> = Vec::new();
    for w in writers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success());
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("WIN "))
        {
            let mut parts = line.split_whitespace().skip(1);
            wins.push((
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            ));
        }
    }
    // The wins must form one unbroken chain from "start" to the file's token: each round
    // has exactly one winner, and nobody overwrote a token they did not start from.
    let mut current = "start".to_string();
    let mut remaining = wins.clone();
    while let Some(pos) = remaining.iter().position(|(from, _)| *from == current) {
        current = remaining.remove(pos).1;
    }
    assert!(
        remaining.is_empty(),
        "{} wins did not chain (lost updates): {:?}",
        remaining.len(),
        &remaining[..remaining.len().min(5)]
    );
    let final_token = Store::open(&cfg, "DEFAULT")
        .unwrap()
        .read()
        .unwrap()
        .token
        .unwrap();
    assert_eq!(final_token.expose(), current);
    // Both writers won some rounds, so the race was real.
    assert!(
        wins.iter().any(|(_, to)| to.starts_with("w1-"))
            && wins.iter().any(|(_, to)| to.starts_with("w2-"))
    );
    assert!(wins.len() >= 50, "only {} wins", wins.len());
}

#[test]
fn manual_write_fails_with_credential_busy_while_the_lock_is_held_and_succeeds_after() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    std::fs::write(&cfg, "[DEFAULT]\ntoken = old\n").unwrap();
    let mut holder = role_command("lock_holder", &cfg);
    holder.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut holder = holder.spawn().unwrap();
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("LOCKED")));

    let set = |input: &str| {
        let mut c = Command::new(common::bin());
        c.arg("set")
            .env_clear()
            .env("DATABRICKS_CONFIG_FILE", &cfg)
            .env("PAT_HTTP_TIMEOUT", "1")
            .env("PAT_WRITE_LOCK_WAIT", "2");
        common::run_with_stdin(&mut c, input.as_bytes())
    };
    let started = std::time::Instant::now();
    let busy = set("new-token\n");
    assert_eq!(
        busy.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert!(String::from_utf8_lossy(&busy.stderr).contains("credential busy"));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "gave up before PAT_WRITE_LOCK_WAIT"
    );
    // --force overrides the downgrade guard, not the lock: one wait, not one per read. With
    // a 4 s wait, one wait ends by 4 s plus process start, two would take 8 s: the bound in
    // between leaves 3.5 s for a loaded machine to start the process.
    let started = std::time::Instant::now();
    let mut c = Command::new(common::bin());
    c.args(["set", "--force"])
        .env_clear()
        .env("DATABRICKS_CONFIG_FILE", &cfg)
        .env("PAT_HTTP_TIMEOUT", "1")
        .env("PAT_WRITE_LOCK_WAIT", "4");
    let forced = common::run_with_stdin(&mut c, b"new-token\n");
    assert_eq!(forced.status.code(), Some(75));
    assert!(
        started.elapsed() < Duration::from_millis(7500),
        "set --force waited {:?}: PAT_WRITE_LOCK_WAIT (4 s) twice",
        started.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        "[DEFAULT]\ntoken = old\n"
    );

    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    let ok = set("new-token\n");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        "[DEFAULT]\ntoken = new-token\n"
    );
    assert!(
        !String::from_utf8_lossy(&ok.stdout).contains("new-token"),
        "set must not echo the token"
    );
}

#[test]
fn a_single_file_bind_mount_gets_an_error_that_says_to_mount_the_directory() {
    // Kubernetes `subPath` mounts are single-file bind mounts: rename onto them fails with
    // EBUSY. Reproduce one in a private mount namespace (the test machines run as root).
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.cfg"), dir.path().join("mounted.cfg"));
    std::fs::write(&src, "[DEFAULT]\ntoken = old\n").unwrap();
    std::fs::write(&dst, "").unwrap();
    let script = format!(
        "mount --bind {src} {dst} && printf new-token | {bin} set; echo \"exit=$?\"; cat {dst}",
        src = src.display(),
        dst = dst.display(),
        bin = common::bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABRICKS_CONFIG_FILE", &dst)
        .env("PAT_HTTP_TIMEOUT", "1")
        .env("PAT_WRITE_LOCK_WAIT", "2")
        .output()
        .expect("unshare(1) from util-linux");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("exit=1"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("mount its directory instead"), "{stderr}");
    // The mounted file is untouched and no temp file is left behind.
    assert!(stdout.contains("token = old"), "{stdout}");
    let temps = temp_files(dir.path());
    assert_eq!(temps, 0);
}

#[test]
fn set_fails_closed_on_an_unparsable_file_even_forced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    let text = "[dev]\ntoken = a\n[prod]\nhost = h\n[dev]\n";
    std::fs::write(&cfg, text).unwrap();
    // A symlink to something that is not a Databricks config file at all.
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "just some words\nnot an ini file\n").unwrap();
    let link = dir.path().join("link-cfg");
    std::os::unix::fs::symlink(&notes, &link).unwrap();
    let set = |file: &Path, args: &[&str]| {
        let mut c = Command::new(common::bin());
        c.arg("set")
            .args(args)
            .env_clear()
            .env("DATABRICKS_CONFIG_FILE", file);
        common::run_with_stdin(&mut c, b"fresh-token")
    };
    for args in [&[][..], &["--force"][..]] {
        let refused = set(&cfg, args);
        assert_eq!(refused.status.code(), Some(1), "{args:?}");
        let why = String::from_utf8_lossy(&refused.stderr);
        assert!(why.contains("not a valid Databricks config file"), "{why}");
        assert!(why.contains("nothing was written"), "{why}");
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text, "{args:?}");
        let refused = set(&link, args);
        assert_eq!(refused.status.code(), Some(1), "{args:?} through a symlink");
        assert_eq!(
            std::fs::read_to_string(&notes).unwrap(),
            "just some words\nnot an ini file\n"
        );
    }
    let empty = Command::new(common::bin())
        .arg("set")
        .env_clear()
        .env("DATABRICKS_CONFIG_FILE", &cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(empty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("empty token"));
}

#[test]
fn a_disk_with_one_free_page_takes_a_swap_and_a_full_one_is_known_beforehand() {
    if unsafe { libc::geteuid() } != 0 {
        let why = "SKIPPED: mounting a 16 KiB tmpfs needs root";
        assert!(
            std::env::var_os("PAT_REQUIRE_ROOT").is_none(),
            "{why} (scripts/test.sh requires it)"
        );
        eprintln!("{why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("disk").join("databrickscfg");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(std::env::current_exe().unwrap())
        .args(CHILD_ARGS)
        .env("PAT_TEST_ROLE", "tiny_disk")
        .env("PAT_TEST_CFG", &cfg)
        .output()
        .expect("unshare(1) from util-linux");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ONE_PAGE check=true"),
        "a disk that can take the write was refused:\n{stdout}"
    );
    assert!(stdout.contains("ONE_PAGE swap=true"), "{stdout}");
    assert!(
        stdout.contains("FULL check=false"),
        "a full disk was not seen before minting:\n{stdout}"
    );
    assert!(stdout.contains("TOKEN Some(\"tok-b\")"), "{stdout}");
}
