//! The cluster store on a real Kubernetes API server (`../shared/envtest`): replicas as real
//! `pat-rotator run` processes with separate config files sharing one Secret and one Lease,
//! the embedded emulator as the workspace, and clients that read each replica's file and
//! call the workspace with what they find, every 250 ms.
//!
//! Compressed cycle: lifetime 12 s, interval 6 s (threshold 6 s, lease 3 s), grace 2 s.
//! The tests run one at a time: each starts an API server, etcd and three replicas on a
//! two-core machine.

mod common;

use common::envtest::Envtest;
use common::*;
use pat_rotator::emulator::{Options, RunningEmulator};
use pat_rotator::Token;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const LIFETIME: u64 = 12;
const INTERVAL: u64 = 6;
const GRACE: u64 = 2;
/// `min(15 s, threshold / 2)` with threshold = `min(interval, 60 s)`.
const LEASE_SECONDS: u64 = 3;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Replica {
    name: String,
    env: RotatorEnv,
    child: Option<Child>,
    log: PathBuf,
}

/// A test that fails half-way must not leave its replicas running (they would keep asking
/// an API server that is gone, for as long as the machine runs).
impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Cluster {
    k8s: Envtest,
    emu: RunningEmulator,
    work: tempfile::TempDir,
    secret: String,
    replicas: Vec<Replica>,
    revoke_seed: bool,
    /// The replicas' token lifetime (their interval is half of it).
    lifetime: u64,
}

impl Cluster {
    /// What every replica sent the API server while it did not hold the Lease
    /// (`pat_rotator_kube_requests_total{role="replica"}`), summed.
    async fn asked_outside_the_holder(&self) -> u64 {
        let mut total = 0;
        for r in &self.replicas {
            let metrics = r.env.metrics().await;
            total += metrics
                .lines()
                .filter(|l| {
                    l.starts_with("pat_rotator_kube_requests_total{")
                        && l.contains("role=\"replica\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64;
        }
        total
    }

    /// An API server, an emulator, the Secret seeded with the emulator's bootstrap token,
    /// and `n` replicas.
    async fn start(n: usize, secret: &str, revoke_seed: bool) -> Option<Cluster> {
        let (mut cluster, seed) = Cluster::bare(secret, revoke_seed).await?;
        cluster.seed(&seed);
        for i in 0..n {
            cluster.spawn(&format!("pod-{i}"));
        }
        Some(cluster)
    }

    /// An API server and an emulator (and its bootstrap token), nothing created yet.
    async fn bare(secret: &str, revoke_seed: bool) -> Option<(Cluster, Token)> {
        let k8s = Envtest::start()?;
        let (emu, seed) = start_emulator(Options::default()).await;
        let cluster = Cluster {
            k8s,
            emu,
            work: tempfile::tempdir().unwrap(),
            secret: secret.to_string(),
            replicas: Vec::new(),
            revoke_seed,
            lifetime: LIFETIME,
        };
        Some((cluster, seed))
    }

    fn seed(&self, seed: &Token) {
        self.k8s
            .create_secret(&self.secret, &[("token", seed.expose())]);
    }

    fn lease(&self) -> String {
        format!("{}-rotation", self.secret)
    }

    /// Starts a replica named `name` with an empty directory; returns its index.
    fn spawn(&mut self, name: &str) -> usize {
        self.spawn_as(name, name)
    }

    /// Starts a replica in directory `name` whose `PAT_INSTANCE` is `instance`.
    fn spawn_as(&mut self, name: &str, instance: &str) -> usize {
        let (mut env, log) = self.replica_env(name, instance);
        let child = env.spawn_run(&log);
        self.replicas.push(Replica {
            name: name.to_string(),
            env,
            child: Some(child),
            log,
        });
        self.replicas.len() - 1
    }

    /// The environment of a replica in directory `name` whose `PAT_INSTANCE` is `instance`,
    /// and its log file.
    fn replica_env(&self, name: &str, instance: &str) -> (RotatorEnv, PathBuf) {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut env = RotatorEnv::new(
            &self.emu.url(),
            None,
            &dir.join("databrickscfg"),
            self.lifetime,
            self.lifetime / 2,
            GRACE,
        );
        env.set("PAT_STORE", "kubernetes");
        env.set("PAT_KUBE_SECRET", &self.secret);
        env.set("KUBECONFIG", self.k8s.kubeconfig.to_str().unwrap());
        env.set("PAT_INSTANCE", instance);
        env.set("PAT_REVOKE_SEED", &self.revoke_seed.to_string());
        (env, dir.join("run.log"))
    }

    fn file_token(&self, i: usize) -> Option<Token> {
        pat_rotator::reader::Reader::new(&self.replicas[i].env.config_path(), "DEFAULT")
            .ok()?
            .token()
            .ok()
            .flatten()
    }

    fn is_live(&self, token: &Token) -> bool {
        self.emu
            .emulator
            .lookup(token)
            .is_some_and(|r| r.is_live(chrono::Utc::now()))
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Replica)> {
        self.replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.child.is_some())
    }

    /// Waits until every running replica is ready, then opens a session on each.
    async fn ready_with_sessions(&self) {
        for (_, r) in self.running() {
            assert!(
                status_becomes(&r.env.url("/readyz"), 200, Duration::from_secs(30)).await,
                "{} never became ready; log:\n{}",
                r.name,
                self.log(&r.name)
            );
            let res = reqwest::Client::new()
                .post(r.env.control_url("/v1/sessions"))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success());
        }
    }

    /// Every replica's log, each under its name (for a failure message).
    fn logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| format!("--- {} ---\n{}", r.name, self.log(&r.name)))
            .collect()
    }

    fn log(&self, name: &str) -> String {
        let r = self.replicas.iter().find(|r| r.name == name).unwrap();
        std::fs::read_to_string(&r.log).unwrap_or_default()
    }

    /// The rotations a replica logged (the JSON records whose `event` is `rotated`).
    fn rotations_by(&self, name: &str) -> usize {
        self.events_by(name, "rotated")
    }

    /// How many JSON log records of a replica carry `event`.
    fn events_by(&self, name: &str, event: &str) -> usize {
        let records: Vec<serde_json::Value> = self
            .log(name)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert!(!records.is_empty(), "{name}: no JSON log");
        records.iter().filter(|r| r["event"] == event).count()
    }

    fn kill(&mut self, name: &str) {
        let r = self.replicas.iter_mut().find(|r| r.name == name).unwrap();
        if let Some(mut child) = r.child.take() {
            sigkill(&mut child);
        }
    }

    /// Clients of every running replica for `duration`: each reads its replica's file and
    /// calls the workspace with whatever token it holds, every 250 ms, as a program would.
    /// Returns the samples the workspace did not answer 200 (with who, when and why): a dead
    /// token in a file shows here and in the emulator's dead-token counter.
    async fn clients(&self, duration: Duration) -> Vec<String> {
        let http = reqwest::Client::new();
        let me = format!("{}/api/2.0/preview/scim/v2/Me", self.emu.url());
        let start = Instant::now();
        let mut bad = Vec::new();
        while start.elapsed() < duration {
            for (i, r) in self.running() {
                let Some(t) = self.file_token(i) else {
                    bad.push(format!("{} at {:?}: no token", r.name, start.elapsed()));
                    continue;
                };
                match http.get(&me).bearer_auth(t.expose()).send().await {
                    Ok(answer) if answer.status().is_success() => {}
                    Ok(answer) => bad.push(format!(
                        "{} at {:?}: {} answered {}",
                        r.name,
                        start.elapsed(),
                        t.fingerprint(),
                        answer.status()
                    )),
                    Err(e) => bad.push(format!(
                        "{} at {:?}: the workspace did not answer: {e}",
                        r.name,
                        start.elapsed()
                    )),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bad
    }

    fn dead_token_requests(&self) -> u64 {
        self.emu.emulator.counters().dead_token_requests
    }

    fn creates(&self) -> u64 {
        self.emu.emulator.counters().creates
    }

    /// Every running replica's file holds the Secret's token.
    fn converged(&self) -> bool {
        let Some(shared) = self.k8s.secret_token(&self.secret) else {
            return false;
        };
        self.running()
            .all(|(i, _)| self.file_token(i).as_ref() == Some(&shared))
    }

    /// Stops every replica, then checks that no replica's log (the cluster store's included)
    /// holds a token value.
    async fn stop(mut self) {
        for r in &mut self.replicas {
            if let Some(child) = r.child.take() {
                sigterm(&child);
                let mut child = child;
                wait_exit(&mut child, Duration::from_secs(10));
                sigkill(&mut child);
            }
        }
        for r in &self.replicas {
            common::assert_no_secrets(&r.name, &self.log(&r.name), &[]);
        }
        self.emu.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_credential_and_mint_once_per_period() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(3, "databricks-pat", false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let creates_before = cluster.creates();
    let asked_before = cluster.asked_outside_the_holder().await;
    let window = Duration::from_secs(60);
    let bad = cluster.clients(window).await;
    let mints = cluster.creates() - creates_before;
    let asked = cluster.asked_outside_the_holder().await - asked_before;
    let periods = window.as_secs() / INTERVAL;
    let dead = cluster.dead_token_requests();
    eprintln!(
        "three replicas, {}s: {mints} mints for {periods} periods, {dead} dead-token requests, {} bad samples",
        window.as_secs(),
        bad.len()
    );
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(dead, 0, "{:#?}", cluster.emu.emulator.events());
    // The Lease and the Secret reach the two other replicas by watch: they ask the API
    // server nothing while the holder renews every second and rotates every period
    // (reading the Lease every renewal period was 60 requests a minute each).
    eprintln!(
        "requests outside the holder in {}s: {asked}",
        window.as_secs()
    );
    assert!(
        asked <= 2 * 2,
        "{asked} requests from the two non-holders in a minute"
    );
    assert!(
        mints as f64 <= 1.2 * periods as f64,
        "{mints} mints for {periods} periods"
    );
    // Liveness is the clients' unbroken run over five lifetimes (above), not a mint count:
    // how many mints that took depends on the scheduler, more mints than periods does not.
    assert!(mints >= 1, "no rotation at all in {}s", window.as_secs());
    assert!(
        eventually(Duration::from_secs(3), async || cluster.converged()).await,
        "replicas do not hold the Secret's token"
    );
    // One replica rotated at a time: only the lease holder mints.
    let rotators: Vec<_> = cluster
        .replicas
        .iter()
        .filter(|r| cluster.rotations_by(&r.name) > 0)
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(rotators.len(), 1, "several replicas minted: {rotators:?}");
    // What an operator sees agrees with the Lease: /metrics and /healthz on every replica.
    let holder = cluster.k8s.lease_holder(&cluster.lease()).unwrap();
    for r in &cluster.replicas {
        let metrics = r.env.metrics().await;
        let is_holder = i64::from(r.name == holder);
        assert!(
            metrics.contains(&format!("pat_rotator_lease_holder {is_holder}\n")),
            "{}: lease_holder is not {is_holder}",
            r.name
        );
        assert!(
            metrics.contains("pat_rotator_cluster_api_reachable 1\n"),
            "{}",
            r.name
        );
        let health: serde_json::Value = reqwest::get(r.env.url("/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let c = &health["loop"]["cluster"];
        assert_eq!(c["holder"], r.name == holder, "{}: {health}", r.name);
        assert_eq!(c["lease_holder"], holder.as_str(), "{}: {health}", r.name);
        assert_eq!(c["api_reachable"], true, "{}: {health}", r.name);
        assert!(c["last_sync"].is_string(), "{}: {health}", r.name);
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_holder_hands_over_and_a_fresh_replica_adopts_without_minting() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(3, "databricks-pat", false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let holder = cluster.k8s.lease_holder(&cluster.lease()).unwrap();
    let creates_before = cluster.creates();
    let killed_at = Instant::now();
    let killed_wall = chrono::Utc::now();
    cluster.kill(&holder);
    let mut takeover = None;
    while killed_at.elapsed() < Duration::from_secs(30) {
        if let Some((h, acquired)) = cluster.k8s.lease_acquired(&cluster.lease()) {
            if h != holder {
                // The successor's own record of when it took the Lease (same machine clock);
                // one before the kill would be a holder this test did not know of.
                let after = acquired - killed_wall;
                assert!(
                    after >= chrono::TimeDelta::zero(),
                    "{h} took the Lease at {acquired}, before the kill of {holder} at {killed_wall}"
                );
                takeover = Some((h, after.to_std().unwrap_or_default()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (successor, after) = takeover.expect("no replica took the lease over");
    eprintln!("kill -9 of {holder}: {successor} took over after {after:?}");
    assert!(
        after <= Duration::from_secs(LEASE_SECONDS + 2),
        "takeover took {after:?}"
    );
    let bad = cluster.clients(Duration::from_secs(18)).await;
    assert!(bad.is_empty(), "{bad:#?}");
    let mints = cluster.creates() - creates_before;
    let periods = (killed_at.elapsed().as_secs() / INTERVAL).max(1);
    assert!(
        mints as f64 <= 1.2 * periods as f64 + 1.0,
        "{mints} mints in {periods} periods across the takeover"
    );

    // A new pod with an empty directory adopts the Secret's token and mints nothing.
    let fresh = cluster.spawn("pod-fresh");
    assert!(
        eventually(Duration::from_secs(10), async || cluster
            .file_token(fresh)
            .is_some_and(|t| cluster.is_live(&t)))
        .await,
        "the fresh replica did not adopt the Secret's token"
    );
    let bad = cluster.clients(Duration::from_secs(2 * INTERVAL)).await;
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(
        cluster.rotations_by("pod-fresh"),
        0,
        "{}",
        cluster.log("pod-fresh")
    );
    assert!(eventually(Duration::from_secs(3), async || cluster.converged()).await);
    assert_eq!(cluster.dead_token_requests(), 0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_rotates_locally_then_converges_and_revokes_local_tokens() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(3, "databricks-pat", false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let creates_before = cluster.creates();
    cluster.k8s.stop_apiserver();
    // Longer than the forced window (6 s) and than a whole token lifetime.
    let outage = Duration::from_secs(LIFETIME + 4);
    let bad = cluster.clients(outage).await;
    assert!(bad.is_empty(), "during the outage: {bad:#?}");
    let local: Vec<_> = cluster
        .emu
        .emulator
        .tokens()
        .into_iter()
        .filter(|t| t.comment.starts_with("pat-rotator:default/databricks-pat/"))
        .collect();
    assert!(
        !local.is_empty(),
        "no replica rotated on its own during the outage"
    );
    cluster.k8s.resume_apiserver();
    let bad = cluster.clients(Duration::from_secs(2 * INTERVAL)).await;
    assert!(bad.is_empty(), "after the outage: {bad:#?}");
    assert!(
        eventually(Duration::from_secs(5), async || cluster.converged()).await,
        "replicas did not converge on the Secret's token"
    );
    // Every pod-local token is revoked once a shared token replaces it, after the grace:
    // revoked, not merely expired (an expiry would come whatever the rotator did).
    let pod_local = || -> Vec<pat_rotator::emulator::TokenRecord> {
        cluster
            .emu
            .emulator
            .tokens()
            .into_iter()
            .filter(|t| t.comment.starts_with("pat-rotator:default/databricks-pat/"))
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(LIFETIME), async || pod_local()
            .iter()
            .all(|t| !t.is_live(chrono::Utc::now())))
        .await,
        "a locally minted token is still live"
    );
    for t in pod_local() {
        assert!(
            t.revoked_at
                .is_some_and(|r| t.expires_at.is_none_or(|e| r < e)),
            "pod-local token {} was not revoked before its expiry: {t:?}\n{}\n{:#?}",
            t.token_id,
            cluster.logs(),
            cluster.emu.emulator.tokens()
        );
    }
    let dead = cluster.dead_token_requests();
    eprintln!(
        "outage of {outage:?}: {} mints ({} pod-local), {dead} dead-token requests",
        cluster.creates() - creates_before,
        local.len()
    );
    assert_eq!(dead, 0, "{:#?}", cluster.emu.emulator.events());
    cluster.stop().await;
}

/// A hung API server (frozen with its connections left open, as a partition leaves them)
/// makes every call time out, and the replica forgets the Secret it knew; once the server
/// answers again, it reads the Secret at once, though the watch that outlived the freeze
/// brings nothing (the Secret did not change). Before, the Secret stayed unknown until its
/// next change: a holder back from an outage decided on its own pod-local token while the
/// Secret held a dead one, and the replicas' pod-local tokens expired instead of being
/// revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_api_server_is_read_again_as_soon_as_it_answers() {
    let _serial = SERIAL.lock().await;
    let Some((mut cluster, seed)) = Cluster::bare("databricks-pat", false).await else {
        return;
    };
    // A minute's token: a lease of 15 s renewed every 5 s, the next rotation 30 s away, so
    // that nothing but the mirror reads the Secret in the window below.
    cluster.lifetime = 60;
    let lease = Duration::from_secs(15);
    cluster.seed(&seed);
    let started = Instant::now();
    cluster.spawn("pod-0");
    cluster.ready_with_sessions().await;
    // After the loop's second orphan reap (grace + two HTTP timeouts after its start),
    // which reads the Secret too.
    tokio::time::sleep(Duration::from_secs(GRACE + 2 * 2 + 2).saturating_sub(started.elapsed()))
        .await;
    cluster.k8s.freeze();
    // A lease renewal and its call's timeout (2 s) fall inside.
    tokio::time::sleep(lease / 3 + Duration::from_millis(2500)).await;
    cluster.k8s.thaw();
    let thawed = chrono::Utc::now();
    let replica = &cluster.replicas[0];
    let last_sync = async || -> Option<chrono::DateTime<chrono::Utc>> {
        let health: serde_json::Value = reqwest::get(replica.env.url("/healthz"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let at = health["loop"]["cluster"]["last_sync"].as_str()?;
        Some(chrono::DateTime::parse_from_rfc3339(at).ok()?.to_utc())
    };
    // The mirror's retry interval (a third of the lease) plus a call.
    let read_again = eventually(lease / 3 + Duration::from_secs(2), async || {
        last_sync().await.is_some_and(|at| at > thawed)
    })
    .await;
    assert!(
        read_again,
        "the Secret was not read again after the freeze (last read {:?}, thawed at {thawed}); log:\n{}",
        last_sync().await,
        cluster.log("pod-0")
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_lease_holder_never_leaves_a_dead_token_in_a_pods_file() {
    let _serial = SERIAL.lock().await;
    let Some((mut cluster, _)) = Cluster::bare("databricks-pat", false).await else {
        return;
    };
    // The Secret holds a token with a known expiry...
    let (token, record) = cluster
        .emu
        .emulator
        .issue(Some(Duration::from_secs(LIFETIME)), "minted elsewhere");
    let state = serde_json::json!({
        "token_id": record.token_id,
        "token_sha256": token.sha256_hex(),
        "expires_at": record.expires_at,
        "rotated_at": record.created_at,
    });
    cluster.k8s.create_secret(
        "databricks-pat",
        &[("token", token.expose()), ("state", &state.to_string())],
    );
    // ...and the Lease a holder that renews it and never rotates.
    cluster.k8s.apply(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: databricks-pat-rotation, namespace: default}\nspec: {holderIdentity: stuck-pod, leaseDurationSeconds: 3}\n",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (stop, kubeconfig) = (stop.clone(), cluster.k8s.kubeconfig.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let _ = std::process::Command::new("kubectl")
                    .args([
                        "annotate",
                        "lease",
                        "databricks-pat-rotation",
                        "--overwrite",
                    ])
                    .arg(format!("renewed={n}"))
                    .env("KUBECONFIG", &kubeconfig)
                    .output();
                std::thread::sleep(Duration::from_millis(700));
            }
        })
    };
    cluster.spawn("pod-0");
    cluster.spawn("pod-1");
    cluster.ready_with_sessions().await;
    let bad = cluster.clients(Duration::from_secs(2 * LIFETIME)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    renewer.join().unwrap();
    assert!(bad.is_empty(), "{bad:#?}\n{}", cluster.log("pod-0"));
    assert_eq!(cluster.dead_token_requests(), 0);
    assert_eq!(
        cluster.k8s.lease_holder(&cluster.lease()).as_deref(),
        Some("stuck-pod")
    );
    assert_eq!(
        cluster.k8s.secret_token("databricks-pat"),
        Some(token.clone()),
        "the stuck holder's Secret was written"
    );
    let alone = cluster
        .emu
        .emulator
        .tokens()
        .iter()
        .filter(|t| {
            t.comment
                .starts_with("pat-rotator:default/databricks-pat/pod-")
        })
        .count();
    assert!(alone >= 2, "{alone} pod-local tokens");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_the_same_instance_name_never_both_hold_the_lease() {
    let _serial = SERIAL.lock().await;
    let Some((mut cluster, seed)) = Cluster::bare("databricks-pat", false).await else {
        return;
    };
    cluster.seed(&seed);
    // A misconfiguration: both processes call themselves "same-pod".
    cluster.spawn_as("a", "same-pod");
    cluster.spawn_as("b", "same-pod");
    cluster.ready_with_sessions().await;
    let before = cluster.creates();
    let window = Duration::from_secs(3 * INTERVAL);
    let bad = cluster.clients(window).await;
    assert!(bad.is_empty(), "{bad:#?}");
    let mints = cluster.creates() - before;
    let rotated: Vec<usize> = ["a", "b"].iter().map(|r| cluster.rotations_by(r)).collect();
    assert!(
        mints <= window.as_secs() / INTERVAL + 1,
        "{mints} mints in {} periods: {rotated:?}",
        window.as_secs() / INTERVAL
    );
    assert!(
        rotated.iter().filter(|n| **n > 0).count() == 1,
        "both processes rotated: {rotated:?}"
    );
    assert_eq!(cluster.dead_token_requests(), 0);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_is_replaced_at_once_and_revoked_only_when_asked() {
    let _serial = SERIAL.lock().await;
    for revoke_seed in [false, true] {
        let secret = format!("seed-{revoke_seed}");
        // The seed as written, not as read back: the replica may replace it before a read.
        let Some((mut cluster, seed)) = Cluster::bare(&secret, revoke_seed).await else {
            return;
        };
        cluster.seed(&seed);
        cluster.spawn("pod-0");
        // Replaced at once: its expiry is unknown.
        assert!(
            eventually(Duration::from_secs(10), async || cluster
                .k8s
                .secret_token(&secret)
                .is_some_and(|t| t != seed))
            .await
        );
        if revoke_seed {
            // Revoked after the grace: however loaded the machine, within a generous deadline.
            assert!(
                eventually(Duration::from_secs(GRACE + 30), async || !cluster
                    .is_live(&seed))
                .await,
                "PAT_REVOKE_SEED=true and the seed lives; log:\n{}",
                cluster.log("pod-0")
            );
        } else {
            // Kept: still live well past the moment it would have been revoked (a slow machine
            // can only make this pass late, never fail it).
            tokio::time::sleep(Duration::from_secs(GRACE + 4)).await;
            assert!(
                cluster.is_live(&seed),
                "PAT_REVOKE_SEED=false and the seed was revoked; log:\n{}",
                cluster.log("pod-0")
            );
        }
        assert_eq!(cluster.dead_token_requests(), 0);
        cluster.stop().await;
    }
}

/// `soak --store kubernetes` with `args` on `k8s`: its report, after checking that it ran to
/// a clean verdict (exit 0).
fn clean_soak(k8s: &Envtest, args: &[&str]) -> serde_json::Value {
    let out = k8s.dir.path().join("soak");
    let output = std::process::Command::new(bin())
        .args(["soak", "--store", "kubernetes", "--out"])
        .arg(&out)
        .args(args)
        .env("KUBECONFIG", &k8s.kubeconfig)
        .env_remove("DATABRICKS_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap_or_default())
            .unwrap_or_else(|_| {
                panic!(
                    "no report; {stdout}\n{}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
    println!("{stdout}");
    assert!(output.status.success(), "{}", report["violations"]);
    assert_eq!(report["verdict"], "clean");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soak_of_the_cluster_store_is_clean_across_a_holder_kill_and_an_api_outage() {
    let _serial = SERIAL.lock().await;
    let Some(k8s) = Envtest::start() else {
        return;
    };
    let report = clean_soak(
        &k8s,
        &[
            "--duration",
            "60",
            "--lifetime",
            "24",
            "--interval",
            "12",
            "--rotators",
            "3",
            "--phase",
            "12",
            "--kill-every",
            "14",
        ],
    );
    assert_eq!(report["settings"]["store"], "kubernetes");
    let holders: std::collections::BTreeSet<&str> = report["leases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["label"].as_str())
        .filter(|h| h.starts_with("soak-"))
        .collect();
    assert!(
        holders.len() >= 2,
        "no takeover in the timeline: {holders:?}"
    );
    let labels = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["label"].as_str().map(str::to_string))
            .collect()
    };
    assert!(labels("kills").iter().any(|k| k.contains("lease holder")));
    assert!(labels("faults")
        .iter()
        .any(|f| f.contains("API server cut off")));
    // The outage made the replicas rotate alone; the verdict found none of those leaked.
    assert!(report["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["comment"].as_str().unwrap_or("").contains("/soak-")));
    // The soak removes its Secret.
    assert!(!k8s
        .kubectl_ok(&["get", "secrets"])
        .contains("pat-rotator-soak"));
}

/// A U2M login shared by a fleet: `pat-rotator login` writes it into the Secret, only the
/// Lease holder refreshes, under a claim in the Secret, and the holder is killed (every other
/// kill timed into a refresh). Under the strictest replay rule (a replayed refresh token
/// revokes the whole login), the soak's verdict is clean: no refresh token sent twice, no
/// family revoked, no request with a dead token, every lost login the documented outcome of
/// a kill mid-refresh. Before, the cluster store refused `oauth-u2m` at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_u2m_login_is_refreshed_once_per_fleet_across_holder_kills() {
    let _serial = SERIAL.lock().await;
    let Some(k8s) = Envtest::start() else {
        return;
    };
    let report = clean_soak(
        &k8s,
        &[
            "--credential",
            "oauth-u2m",
            "--duration",
            "50",
            "--lifetime",
            "20",
            "--interval",
            "10",
            "--rotators",
            "3",
            "--phase",
            "12",
            "--kill-every",
            "14",
        ],
    );
    assert_eq!(report["settings"]["credential"], "oauth-u2m");
    let oauth = &report["figures"]["oauth"];
    assert_eq!(oauth["replays"], 0, "{oauth}");
    assert_eq!(oauth["family_revocations"], 0, "{oauth}");
    assert!(
        oauth["refreshes"].as_u64().unwrap_or(0) >= 3,
        "too few refreshes: {oauth}"
    );
    assert_eq!(report["figures"]["dead_token_requests"], 0);
    let kills: Vec<&str> = report["kills"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["label"].as_str())
        .collect();
    assert!(
        kills.iter().any(|k| k.contains("lease holder")),
        "{kills:?}"
    );
}

/// An old manifest re-applied over the Secret (`kubectl replace`, which drops `state`), then
/// a garbled `data.token` with `state` kept: before, every replica mirrored the dead token
/// within a second and the fleet was down. Now no pod's file ever holds it, and the holder
/// replaces it with a token minted with its own live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_token_written_into_the_secret_never_reaches_a_pods_file() {
    let _serial = SERIAL.lock().await;
    let secret = "rewritten";
    let Some(cluster) = Cluster::start(3, secret, false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let (dead, _) = cluster
        .emu
        .emulator
        .issue(Some(Duration::from_secs(3600)), "an old manifest");
    cluster.emu.emulator.revoke(&dead);
    // kubectl create ... --dry-run=client -o yaml | kubectl replace -f -
    let value = cluster.work.path().join("old-token");
    pat_rotator::store::atomic_write_private(&value, dead.expose().as_bytes()).unwrap();
    let manifest = cluster.k8s.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        secret,
        &format!("--from-file=token={}", value.display()),
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    let path = cluster.work.path().join("old-manifest.yaml");
    std::fs::write(&path, manifest).unwrap();
    cluster
        .k8s
        .kubectl_ok(&["replace", "-f", path.to_str().unwrap()]);
    let bad = cluster.clients(Duration::from_secs(2 * INTERVAL)).await;
    assert!(bad.is_empty(), "a pod's file held a dead token: {bad:#?}");
    let replaced = cluster.k8s.secret_token(secret);
    assert!(
        replaced
            .as_ref()
            .is_some_and(|t| *t != dead && cluster.is_live(t)),
        "the holder did not replace the dead token in the Secret"
    );

    // Garbage in data.token, the state kept.
    cluster.k8s.kubectl_ok(&[
        "patch",
        "secret",
        secret,
        "-p",
        r#"{"data":{"token":"Z2FyYmFnZS10b2tlbg=="}}"#,
    ]);
    let bad = cluster.clients(Duration::from_secs(2 * INTERVAL)).await;
    assert!(
        bad.is_empty(),
        "a pod's file held a garbled token: {bad:#?}"
    );
    assert!(
        cluster
            .k8s
            .secret_token(secret)
            .is_some_and(|t| t.expose() != "garbage-token" && cluster.is_live(&t)),
        "the holder did not replace the garbled token"
    );
    assert!(
        eventually(Duration::from_secs(10), async || cluster.converged()).await,
        "the replicas did not converge on the holder's new token"
    );
    cluster.stop().await;
}

/// The Lease rules a stop and a restart rely on: SIGTERM releases the Lease on the way out
/// (the next holder need not wait out the duration), and a killed holder's restarted
/// container, under the same name, acquires it anew once its old record expires (never
/// trusting the dead container's renewals as its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_a_restarted_holder_acquires_it_anew() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(2, "databricks-pat", false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let holder = cluster.k8s.lease_holder(&cluster.lease()).unwrap();
    let r = cluster
        .replicas
        .iter_mut()
        .find(|r| r.name == holder)
        .unwrap();
    let mut child = r.child.take().unwrap();
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // Read at once: a Lease that was not released still names the stopped holder for its
    // whole duration (a slow read can only let this pass, never fail it).
    assert_ne!(
        cluster.k8s.lease_holder(&cluster.lease()).as_deref(),
        Some(holder.as_str()),
        "the Lease still names the holder that stopped"
    );
    let released = cluster
        .log(&holder)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|r| r["event"] == "lease_released");
    assert!(released, "no lease_released event in {holder}'s log");

    // The other replica takes it; kill -9 it and restart it under the same name.
    let successor = cluster
        .replicas
        .iter()
        .find(|r| r.name != holder && r.child.is_some())
        .unwrap()
        .name
        .clone();
    assert!(
        eventually(Duration::from_secs(15), async || cluster
            .k8s
            .lease_holder(&cluster.lease())
            .as_deref()
            == Some(successor.as_str()))
        .await,
        "{successor} never took the released Lease"
    );
    let killed_wall = chrono::Utc::now();
    cluster.kill(&successor);
    cluster.spawn(&successor);
    assert!(
        eventually(Duration::from_secs(20), async || cluster
            .k8s
            .lease_acquired(&cluster.lease())
            .is_some_and(|(h, at)| h == successor && at > killed_wall))
        .await,
        "the restarted {successor} did not acquire the Lease anew"
    );
    assert_eq!(cluster.dead_token_requests(), 0);
    cluster.stop().await;
}

/// Another writer keeps changing the Secret (annotations, as a GitOps tool or a controller
/// does) while the replicas rotate: the holder's compare-and-swap meets version conflicts
/// and writes again over a fresh read; no replica ever holds a dead token, a conflict is
/// never paid for with another mint, and the replicas converge. The writer patches as fast
/// as the API server answers (a few hundred a second here), so that every rotation's
/// read-modify-write window sees foreign writes: at least one conflict is certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rewritten_under_the_rotation_never_costs_a_live_token() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(2, "databricks-pat", false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let stop = CancellationToken::new();
    let (mut proxy, proxy_url) = cluster.k8s.proxy();
    let churn = {
        let (stop, http) = (stop.clone(), reqwest::Client::new());
        let url = format!("{proxy_url}/api/v1/namespaces/default/secrets/databricks-pat");
        tokio::spawn(async move {
            // Only the writes the API server took count; the first refusal says why.
            let (mut n, mut written, mut refused) = (0u64, 0u64, None);
            while !stop.is_cancelled() {
                n += 1;
                let patch =
                    serde_json::json!({"metadata": {"annotations": {"churn": n.to_string()}}});
                let sent = http
                    .patch(&url)
                    .header("content-type", "application/merge-patch+json")
                    .body(patch.to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => written += 1,
                    other => {
                        refused.get_or_insert(format!("{other:?}"));
                    }
                }
            }
            (written, refused)
        })
    };
    let creates_before = cluster.creates();
    let bad = cluster.clients(Duration::from_secs(4 * INTERVAL)).await;
    stop.cancel();
    let (writes, refused) = churn.await.unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let mints = cluster.creates() - creates_before;
    let conflicts: usize = ["pod-0", "pod-1"]
        .iter()
        .map(|name| cluster.events_by(name, "secret_conflict"))
        .sum();
    eprintln!(
        "{writes} foreign writes to the Secret, {conflicts} write conflicts, {mints} mints in 4 periods"
    );
    assert!(
        writes > 400,
        "the Secret was hardly rewritten ({writes} writes; first refusal: {refused:?})"
    );
    assert!(
        conflicts >= 1,
        "no write of the Secret met a conflict: the test did not test what it says"
    );
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(cluster.dead_token_requests(), 0);
    // One mint a period (4) and one at the window's edge: a version conflict is written
    // again, never paid for with another mint.
    assert!(
        mints <= 5,
        "{mints} mints in 4 periods: conflicts cost tokens"
    );
    assert!(
        eventually(Duration::from_secs(5), async || cluster.converged()).await,
        "replicas do not hold the Secret's token"
    );
    cluster.stop().await;
}

/// `once` with the cluster store takes part as a replica: it takes the free Lease, rotates
/// the Secret's token (a seed has unknown expiry) and writes it into its own file; a second
/// `once` finds nothing due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_takes_part_as_a_replica() {
    let _serial = SERIAL.lock().await;
    let Some((cluster, seed)) = Cluster::bare("once-replica", false).await else {
        return;
    };
    cluster.seed(&seed);
    let (env, _log) = cluster.replica_env("pod-once", "pod-once");
    let once = env.command(&["once"]).output().unwrap();
    assert_eq!(
        once.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let shared = cluster.k8s.secret_token("once-replica").unwrap();
    assert_ne!(shared, seed, "the seed was not rotated");
    assert!(cluster.is_live(&shared));
    let file = pat_rotator::reader::Reader::new(&env.config_path(), "DEFAULT")
        .unwrap()
        .token()
        .unwrap();
    assert_eq!(
        file,
        Some(shared.clone()),
        "the pod's file holds the Secret's token"
    );
    let again = env.command(&["once"]).output().unwrap();
    assert_eq!(
        again.status.code(),
        Some(3),
        "a fresh shared token is not due"
    );
    assert_eq!(cluster.k8s.secret_token("once-replica"), Some(shared));
    cluster.stop().await;
}

/// The official Databricks SDK for Go against a replica of the cluster store: one
/// long-lived client on the replica's metadata-service endpoint and a client per call from
/// the replica's mirrored file, side by side across at least 4 rotations of the shared
/// token, with 0 errors and no request with a dead token. Run by `scripts/test.sh` once the
/// Go SDK suite has built the client (`PAT_GO_CLIENT`, from `tests/go`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Go SDK client: run by scripts/test.sh"]
async fn the_go_sdk_reads_a_replicas_mirrored_file_and_metadata_endpoint() {
    let client = std::env::var("PAT_GO_CLIENT").expect("PAT_GO_CLIENT: the built tests/go");
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::start(2, "databricks-pat", false).await else {
        return;
    };
    cluster.ready_with_sessions().await;
    let replica = &cluster.replicas[0];
    let status = replica.env.command(&["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let metadata_url = status["metadata_url"]
        .as_str()
        .expect("a metadata URL")
        .to_string();
    let config = cluster
        .work
        .path()
        .join(&replica.name)
        .join("databrickscfg");
    let creates_before = cluster.creates();
    let seconds = (4 * INTERVAL + 4).to_string();
    let home = cluster.work.path().display().to_string();
    let run = |args: Vec<String>| {
        std::process::Command::new(&client)
            .args(&args)
            .args(["-seconds", &seconds])
            .env_clear()
            .env("HOME", &home)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let emu_url = cluster.emu.url();
    let clients = [
        run(vec![
            "-mode".into(),
            "metadata".into(),
            "-host".into(),
            emu_url,
            "-metadata-url".into(),
            metadata_url,
        ]),
        run(vec![
            "-mode".into(),
            "file".into(),
            "-config".into(),
            config.display().to_string(),
        ]),
    ];
    for child in clients {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("{}");
        let result: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        eprintln!("go sdk on a replica: {line}");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(result["errors"], 0, "{line}");
        assert!(result["calls"].as_u64().unwrap_or(0) >= 40, "{line}");
    }
    let rotations = cluster.creates() - creates_before;
    eprintln!("go sdk on a replica: across {rotations} rotations");
    assert!(
        rotations >= 4,
        "only {rotations} rotations while the clients ran"
    );
    assert_eq!(cluster.dead_token_requests(), 0);
    cluster.stop().await;
}
