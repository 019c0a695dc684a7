use super::*;
use chrono::TimeDelta;

fn store(dir: &Path) -> Store {
    Store::open(&dir.join("databrickscfg"), "DEFAULT").unwrap()
}

/// Writes `value` as if a rotation minted it `now` with `lifetime` seconds to live.
fn seed_recorded(s: &Store, value: &str, now: DateTime<Utc>, lifetime: i64) {
    let t = Token::new(value);
    let r = Rotation::new(
        format!("id-{value}"),
        now + TimeDelta::seconds(lifetime),
        "me",
    );
    s.swap(None, &t, None, Duration::from_secs(1), Some(&r), &|| now)
        .unwrap();
}

#[test]
fn new_file_is_0600_and_existing_mode_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let w = Duration::from_secs(1);
    assert!(matches!(
        s.swap(
            None,
            &Token::new("t1"),
            Some("https://h"),
            w,
            None,
            &Utc::now
        )
        .unwrap(),
        SwapOutcome::Swapped
    ));
    let mode = fs::metadata(&s.paths().config)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    fs::set_permissions(&s.paths().config, fs::Permissions::from_mode(0o640)).unwrap();
    s.swap(
        Some(&Token::new("t1")),
        &Token::new("t2"),
        None,
        w,
        None,
        &Utc::now,
    )
    .unwrap();
    assert_eq!(
        fs::metadata(&s.paths().config)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    let text = fs::read_to_string(&s.paths().config).unwrap();
    assert_eq!(text, "[DEFAULT]\nhost = https://h\ntoken = t2\n");
}

#[test]
fn swap_refuses_when_the_file_moved_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let w = Duration::from_secs(1);
    s.swap(None, &Token::new("a"), None, w, None, &Utc::now)
        .unwrap();
    match s
        .swap(
            Some(&Token::new("stale")),
            &Token::new("b"),
            None,
            w,
            None,
            &Utc::now,
        )
        .unwrap()
    {
        SwapOutcome::Conflict { current } => assert_eq!(current, Some(Token::new("a"))),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(s.read().unwrap().token, Some(Token::new("a")));
}

#[test]
fn state_mismatch_means_unknown_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let now = Utc::now();
    seed_recorded(&s, "a", now, 60);
    let snap = s.read().unwrap();
    assert_eq!(
        snap.times().unwrap().expires_at,
        now + TimeDelta::seconds(60)
    );
    // Someone edits the file by hand: the state no longer describes it.
    fs::write(&s.paths().config, "[DEFAULT]\ntoken = b\n").unwrap();
    assert_eq!(s.read().unwrap().times(), None);
}

/// A neighbour on another profile of the file lost its token in the soak: its forced
/// rotation waited out the other profile's mint (a 1.5 s provider latency) on a file-wide lock.
#[tokio::test(flavor = "current_thread")]
async fn rotators_of_other_profiles_never_wait_on_each_others_rotation_lock() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    let default = Store::open(&cfg, "DEFAULT").unwrap();
    let default_too = Store::open(&cfg, "DEFAULT").unwrap();
    let neighbour = Store::open(&cfg, "neighbour").unwrap();
    let seen = default
        .try_rotation(|| async {
            (
                neighbour.try_rotation(|| async {}).await.unwrap().is_some(),
                neighbour.wait_rotation_free(Duration::ZERO).await.unwrap(),
                default_too
                    .try_rotation(|| async {})
                    .await
                    .unwrap()
                    .is_some(),
                default_too
                    .wait_rotation_free(Duration::ZERO)
                    .await
                    .unwrap(),
            )
        })
        .await
        .unwrap();
    // While DEFAULT mints: the neighbour rotates at once, a second DEFAULT rotator does not.
    assert_eq!(seen, Some((true, true, false, false)));
    // And once the mint ends, the second DEFAULT rotator may.
    assert!(default_too
        .try_rotation(|| async {})
        .await
        .unwrap()
        .is_some());
    assert!(default_too
        .wait_rotation_free(Duration::ZERO)
        .await
        .unwrap());
}

#[test]
fn two_profiles_of_one_file_keep_separate_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    let a = Store::open(&cfg, "DEFAULT").unwrap();
    let b = Store::open(&cfg, "prod").unwrap();
    let now = Utc::now();
    seed_recorded(&a, "tok-a", now, 60);
    // [prod] has no token yet: a named profile does not inherit [DEFAULT]'s (the SDK
    // reads each profile's own keys).
    let t = Token::new("tok-b");
    let r = Rotation::new("id-tok-b", now + TimeDelta::seconds(120), "me");
    b.swap(None, &t, None, Duration::from_secs(1), Some(&r), &|| now)
        .unwrap();
    let (sa, sb) = (a.read().unwrap(), b.read().unwrap());
    assert_eq!(sa.times().unwrap().expires_at, now + TimeDelta::seconds(60));
    assert_eq!(
        sb.times().unwrap().expires_at,
        now + TimeDelta::seconds(120)
    );
    // The contract's top-level fields still describe the first profile.
    let raw: serde_json::Value =
        serde_json::from_slice(&fs::read(&a.paths().state).unwrap()).unwrap();
    assert_eq!(raw["token_id"], "id-tok-a");
    assert_eq!(raw["profile"], "DEFAULT");
    assert_eq!(raw["other_profiles"]["prod"]["token_id"], "id-tok-b");
}

#[test]
fn symlinked_config_keeps_the_link_and_writes_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.cfg");
    fs::write(&real, "[DEFAULT]\ntoken = a\n").unwrap();
    let link = dir.path().join("link.cfg");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let s = Store::open(&link, "DEFAULT").unwrap();
    s.swap(
        Some(&Token::new("a")),
        &Token::new("b"),
        None,
        Duration::from_secs(1),
        None,
        &Utc::now,
    )
    .unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(&real).unwrap(), "[DEFAULT]\ntoken = b\n");
    let dangling = dir.path().join("dangling.cfg");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    assert!(matches!(
        Store::open(&dangling, "DEFAULT"),
        Err(StoreError::DanglingSymlink { .. })
    ));
}

#[test]
fn stale_temp_files_are_removed_by_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let stale = dir.path().join(".databrickscfg.tmp-crashed");
    fs::write(&stale, "half").unwrap();
    s.swap(
        None,
        &Token::new("a"),
        None,
        Duration::from_secs(1),
        None,
        &Utc::now,
    )
    .unwrap();
    assert!(!stale.exists());
}

#[test]
fn manual_set_fails_closed_on_an_unparsable_file_even_forced() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let text = "[dev]\ntoken = x\n[prod]\nhost = h\n[dev]\n";
    fs::write(&s.paths().config, text).unwrap();
    let w = Duration::from_secs(1);
    for force in [false, true] {
        let r = s.set_manual(
            &Token::new("n"),
            None,
            force,
            None,
            w,
            Utc::now(),
            |_, _| Ok(()),
        );
        assert!(matches!(r, Err(StoreError::Parse { .. })), "{r:?}");
        assert_eq!(
            fs::read_to_string(&s.paths().config).unwrap(),
            text,
            "force {force}: the other profiles must survive"
        );
    }
    assert!(matches!(
        s.set_manual(
            &Token::new(" "),
            None,
            true,
            None,
            w,
            Utc::now(),
            |_, _| Ok(())
        ),
        Err(StoreError::EmptyToken)
    ));
}

#[test]
fn manual_set_queues_the_recorded_token_for_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let now = Utc::now();
    let w = Duration::from_secs(1);
    seed_recorded(&s, "a", now, 600);
    s.set_manual(&Token::new("b"), None, false, None, w, now, |cur, state| {
        assert_eq!(cur, Some(&Token::new("a")));
        assert!(state.times_for(cur).is_some());
        Ok(())
    })
    .unwrap()
    .unwrap();
    let snap = s.read().unwrap();
    assert_eq!(snap.state.pending_revocations.len(), 1);
    // Setting the token that is already there changes nothing.
    s.set_manual(&Token::new("b"), None, false, None, w, now, |_, _| {
        Err("not asked".into())
    })
    .unwrap()
    .unwrap();
    assert_eq!(s.read().unwrap().state.pending_revocations.len(), 1);
    assert_eq!(snap.state.pending_revocations[0].token_id, "id-a");
    assert_eq!(snap.times(), None);
}

#[test]
fn a_state_write_that_fails_leaves_the_config_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let now = Utc::now();
    seed_recorded(&s, "old", now, 60);
    let before = fs::read(&s.paths().config).unwrap();
    // The state path replaced by a directory: the state write must fail.
    fs::remove_file(&s.paths().state).unwrap();
    fs::create_dir(&s.paths().state).unwrap();
    let new = Token::new("new");
    let r = s.swap(
        Some(&Token::new("old")),
        &new,
        None,
        Duration::from_secs(1),
        Some(&Rotation::new("id-new", now, "me")),
        &|| now,
    );
    assert!(r.is_err());
    assert_eq!(
        fs::read(&s.paths().config).unwrap(),
        before,
        "the new token reached the file though its state was never written"
    );
    assert!(
        s.check_writable().is_err(),
        "a swap is known to fail beforehand"
    );
}

#[test]
fn the_token_on_disk_is_never_revocable() {
    let now = Utc::now();
    let mut st = State::default();
    let on_disk = Token::new("visible");
    for (id, token) in [("a", &on_disk), ("b", &Token::new("gone"))] {
        st.queue_revocation(PendingRevocation {
            token_id: id.into(),
            token_sha256: token.sha256_hex(),
            not_before: now - TimeDelta::seconds(1),
            expires_at: None,
            pod_local: false,
            seed: false,
        });
    }
    let due: Vec<&str> = st
        .revocable(Some(&on_disk), now)
        .iter()
        .map(|p| p.token_id.as_str())
        .collect();
    assert_eq!(due, vec!["b"]);
}

#[test]
fn an_oversized_config_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let mut text = String::from("[DEFAULT]\ntoken = t\n");
    text.push_str(&"; padding\n".repeat((MAX_CONFIG_BYTES / 10 + 1) as usize));
    fs::write(&s.paths().config, text).unwrap();
    assert!(matches!(s.read(), Err(StoreError::TooLarge { .. })));
}

#[test]
fn a_named_profile_gets_its_own_host_and_a_different_one_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("databrickscfg");
    fs::write(&cfg, "[DEFAULT]\nhost = https://h0\n[p]\n").unwrap();
    let s = Store::open(&cfg, "p").unwrap();
    s.swap(
        None,
        &Token::new("t"),
        Some("https://h1"),
        Duration::from_secs(1),
        None,
        &Utc::now,
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(&cfg).unwrap(),
        "[DEFAULT]\nhost = https://h0\n[p]\nhost = https://h1\ntoken = t\n"
    );
    let snap = s.read().unwrap();
    assert_eq!(snap.host_mismatch(Some("https://h1/")), None);
    assert!(snap
        .host_mismatch(Some("https://other"))
        .is_some_and(|w| w.contains("https://h1") && w.contains("DATABRICKS_HOST")));
}

/// Runs `f` on a thread and fails the test if it has not returned within 5 s: a blocking
/// open of a FIFO would hang for good.
fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the call blocked on an odd file")
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn a_fifo_at_any_protocol_path_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    for which in ["config", "lock", "state"] {
        let s = store(dir.path());
        seed_recorded(&s, "t1", Utc::now(), 600);
        let path = match which {
            "config" => s.paths().config.clone(),
            "lock" => s.paths().lock.clone(),
            _ => s.paths().state.clone(),
        };
        fs::remove_file(&path).unwrap();
        mkfifo(&path);
        let reader = s.clone();
        let result = within_5s(move || reader.read().map(|snap| snap.state_error));
        match which {
            // The state is advisory: unreadable means "expiry unknown", with the reason.
            "state" => {
                let why = result.unwrap().unwrap();
                assert!(why.contains(NOT_A_REGULAR_FILE), "{why}");
            }
            _ => {
                let why = result.unwrap_err().to_string();
                assert!(why.contains(NOT_A_REGULAR_FILE), "{which}: {why}");
            }
        }
        fs::remove_file(&path).unwrap();
    }
}

#[test]
fn lock_state_and_control_paths_are_never_followed_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    // A dangling link at the lock path: following it would create the target.
    let target = dir.path().join("planted-target");
    std::os::unix::fs::symlink(&target, &s.paths().lock).unwrap();
    assert!(s.read().is_err());
    assert!(
        !target.exists(),
        "the rotator created a file through a planted link"
    );
    fs::remove_file(&s.paths().lock).unwrap();

    // A state path linked to a world-writable file: the write replaces the link with a
    // private file and leaves the target alone.
    let open = dir.path().join("world-writable");
    fs::write(&open, "{}").unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).unwrap();
    std::os::unix::fs::symlink(&open, &s.paths().state).unwrap();
    seed_recorded(&s, "t1", Utc::now(), 600);
    let meta = fs::symlink_metadata(&s.paths().state).unwrap();
    assert!(meta.is_file(), "the state path is still a link");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::read_to_string(&open).unwrap(), "{}");
    assert_eq!(
        fs::metadata(&open).unwrap().permissions().mode() & 0o777,
        0o666
    );
    // And reads never follow one either.
    fs::remove_file(&s.paths().state).unwrap();
    std::os::unix::fs::symlink(&open, &s.paths().state).unwrap();
    let snap = s.read().unwrap();
    assert!(snap.state_error.unwrap().contains("symlink"));
}

#[test]
fn a_huge_state_file_is_refused_not_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    seed_recorded(&s, "t1", Utc::now(), 600);
    let mut big = fs::read(&s.paths().state).unwrap();
    big.resize(44 * 1024 * 1024, b' ');
    fs::write(&s.paths().state, &big).unwrap();
    let snap = s.read().unwrap();
    assert!(snap.times().is_none(), "expiry unknown: rotate");
    assert!(snap.state_error.unwrap().contains("larger than"));
}

#[test]
fn a_config_directory_writable_by_others_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    assert!(s.directory_warning().is_none());
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let w = s.directory_warning().unwrap();
    assert!(w.contains("writable by group or others"), "{w}");
}

#[test]
fn a_replaced_token_is_revocable_one_second_after_the_grace_and_never_before() {
    let written = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    // The metadata endpoint advertises at most now + grace, in whole seconds, with `now`
    // taken before its read: the revocation comes a full second after that.
    for (grace_s, expected_s) in [(0u64, 1i64), (2, 3), (30, 31)] {
        assert_eq!(
            revoke_not_before(written, Duration::from_secs(grace_s)),
            written + TimeDelta::seconds(expected_s)
        );
    }
}

/// On a local file system a snapshot is read on the caller's thread while no writer holds
/// the lock (a hand-off to a file thread costs an idle rotator about three context
/// switches), and waited for on a thread while one does, so the event loop never waits for
/// a lock. The first half fails when every read is handed over (the only file thread is
/// kept busy until the read returns); the second when a read waits in place (it would
/// block the loop that holds the lock until `Busy`).
#[test]
fn a_snapshot_is_read_in_place_only_while_no_writer_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    seed_recorded(&s, "t1", Utc::now(), 60);
    assert!(
        crate::watch::is_local_file_system(dir.path()),
        "this test needs its temporary directory on a local file system"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let busy = tokio::task::spawn_blocking(move || held.recv());
        let read =
            tokio::time::timeout(Duration::from_secs(10), CredentialStore::snapshot(&s)).await;
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        let snap = read.expect("the read waited for a file thread though no writer held the lock");
        assert_eq!(snap.unwrap().token.unwrap().expose(), "t1");

        let lock_file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&s.paths().lock)
            .unwrap();
        let mut lock = fd_lock::RwLock::new(lock_file);
        let writer = lock.try_write().unwrap();
        assert!(s.read_in_place().is_none(), "read in place under a writer");
        let reader = tokio::spawn({
            let s = s.clone();
            async move { CredentialStore::snapshot(&s).await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !reader.is_finished(),
            "a read finished under the writer's lock"
        );
        drop(writer);
        let snap = reader.await.unwrap().unwrap();
        assert_eq!(snap.token.unwrap().expose(), "t1");
    });
}

/// A directory that does not exist yet (the first rotation creates it) is not taken for a
/// remote file system for good: once it exists, reads run in place.
#[test]
fn reads_run_in_place_once_a_missing_directory_exists() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("later");
    let s = Store::open(&dir.join("databrickscfg"), "DEFAULT").unwrap();
    assert!(
        s.read_in_place().is_none(),
        "read in place without a directory"
    );
    seed_recorded(&s, "t1", Utc::now(), 60);
    let snap = s.read_in_place().expect("handed to a thread for good");
    assert_eq!(snap.unwrap().token.unwrap().expose(), "t1");
}

/// A directory the rotator (re)creates is 0700, and a state file someone loosened is set
/// back to 0600 at start (it stayed 0666 across a restart).
#[test]
fn a_recreated_directory_is_private_and_a_loosened_state_file_is_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir.path().join("gone").join("again"));
    seed_recorded(&s, "t1", Utc::now(), 600);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dir.path().join("gone").join("again")), 0o700);
    assert_eq!(mode(&dir.path().join("gone")), 0o700);
    fs::set_permissions(&s.paths().state, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(s.tighten_state().is_some_and(|w| w.contains("0666")));
    assert_eq!(mode(&s.paths().state), 0o600);
    assert_eq!(s.tighten_state(), None);
}

/// A writer stopped or hung while it holds the lock costs a reader one wait, not one per
/// read: the soak stopped a rotator inside its write, and its sibling waited for that lock
/// three times in a row (its turn's read, the rotation lock, the re-read before minting),
/// past the token's expiry. After the first read that times out, reads do not wait until
/// one gets the lock again; the clones the loop and serving use share what was learnt.
#[test]
fn a_lock_held_past_one_read_wait_is_not_waited_for_again_until_it_frees() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path()).with_read_wait(Duration::from_millis(200));
    seed_recorded(&s, "t1", Utc::now(), 60);
    let serving = s.clone().with_read_wait(Duration::from_millis(100));
    assert_eq!(s.read_wait_now(), Duration::from_millis(200));

    let writer = crate::soak::ForeignLock::ExclusiveWrite
        .take(&s.paths().config)
        .unwrap();
    assert!(matches!(s.read(), Err(StoreError::Busy { .. })));
    assert_eq!(
        s.read_wait_now(),
        Duration::ZERO,
        "a stuck lock is waited for again"
    );
    assert_eq!(serving.read_wait_now(), Duration::ZERO);
    match serving.read() {
        Err(StoreError::Busy { waited, .. }) => assert_eq!(waited, Duration::ZERO),
        other => panic!("read under a stuck writer: {other:?}"),
    }

    drop(writer);
    assert_eq!(s.read().unwrap().token.unwrap().expose(), "t1");
    assert_eq!(s.read_wait_now(), Duration::from_millis(200));
    assert_eq!(serving.read_wait_now(), Duration::from_millis(100));
}

/// A rotation lock held by a holder that shows no progress (a foreign `lockf`) costs one
/// stall wait: the next wait, with the heartbeat still unmoved, is stalled at once (the
/// soak's U2M run waited 2 s at the interval and 2 s again at the forced window, past the
/// provider's margin). Once the lock is free the memory goes, and a new holder gets the
/// whole wait.
#[tokio::test(start_paused = true)]
async fn a_holder_seen_stalled_is_not_waited_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    seed_recorded(&s, "t1", Utc::now(), 60);
    let waited = async |s: &Store| {
        let t0 = tokio::time::Instant::now();
        let stall = Some(Duration::from_secs(2));
        let outcome = s
            .wait_rotation(Duration::from_secs(30), stall)
            .await
            .unwrap();
        (outcome, t0.elapsed())
    };
    let lock = crate::soak::ForeignLock::WholeRotation;
    let held = lock.take(&s.paths().config).unwrap();
    let (first, took) = waited(&s).await;
    assert_eq!(first, RotationWait::Stalled);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    let (again, took) = waited(&s).await;
    assert_eq!(again, RotationWait::Stalled);
    assert!(
        took < Duration::from_millis(100),
        "the same stall waited for again: {took:?}"
    );

    drop(held);
    assert_eq!(waited(&s).await.0, RotationWait::Free);
    let held = lock.take(&s.paths().config).unwrap();
    let (_, took) = waited(&s).await;
    assert!(
        took >= Duration::from_secs(2),
        "a new holder's stall was not waited for: {took:?}"
    );
    drop(held);
}
