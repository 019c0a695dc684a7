//! Setting the soak up: the embedded emulator (or a real workspace), the rotator processes
//! sharing one config file, and the reader processes of every kind.

use super::reader_proc::ReaderLine;
use super::{
    near_expiry_margin, now_ms, SoakError, SoakOptions, HTTP_TIMEOUT, READER_POLL_MS, SOAK_COMMENT,
};
use crate::emulator::{Emulator, Options, RunningEmulator};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// Everything the soak started, and where it writes.
pub(super) struct Rig {
    pub exe: PathBuf,
    pub out: PathBuf,
    /// Every (config file, profile) a rotator keeps: the configs' `DEFAULT`, and the
    /// neighbour's own profile of the shared file (file store).
    pub profiles: Vec<(PathBuf, String)>,
    /// The cluster store's Secret, Lease and API-server gate (`--store kubernetes`).
    pub cluster: Option<super::cluster::ClusterRig>,
    pub emulator: Option<RunningEmulator>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub t0: i64,
    pub start: Instant,
    pub rotators: Vec<RotatorProc>,
    pub readers: Vec<Child>,
    /// Every line the readers printed.
    pub lines: Arc<Mutex<Vec<ReaderLine>>>,
    /// The instance the neighbour's tokens carry (its default one), to judge each profile
    /// apart (file store).
    pub neighbour_instance: Option<String>,
    /// Each rotator's control listener, for session leases.
    pub control_urls: Vec<String>,
}

pub(super) fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> SoakError + '_ {
    move |e| SoakError::Setup(format!("{what}: {e}"))
}

/// The profile of the shared config file that the soak's neighbour rotator keeps.
pub(super) const NEIGHBOUR_PROFILE: &str = "neighbour";

/// How long a rotator has to start listening.
const LISTEN_WAIT: Duration = Duration::from_secs(20);

fn free_port() -> Result<u16, SoakError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(setup("cannot find a free port"))
}

pub(super) async fn start(opts: &SoakOptions) -> Result<Rig, SoakError> {
    crate::provider::install_crypto_provider();
    let exe = std::env::current_exe().map_err(setup("cannot find this program"))?;
    let out = report_folder(opts)?;
    let (emulator, host, bootstrap) = workspace(opts).await?;
    let cluster = match opts.kubernetes {
        true => Some(super::cluster::ClusterRig::for_soak(opts, &out, &bootstrap).await?),
        false => None,
    };
    let configs = config_files(opts, &out)?;
    let started_at = chrono::Utc::now();
    let t0 = now_ms();
    let start = Instant::now();

    // One capability for every rotator, fixed in advance as a Kubernetes Secret would fix it:
    // rotators sharing a file each publish their own URL, readers are told all of them.
    let control_secret = crate::secret::ControlSecret::random();
    let fleet = Fleet {
        opts,
        host: &host,
        control_secret: &control_secret,
        oauth: super::oauth::child_oauth(opts.credential, emulator.as_ref().map(|e| &e.emulator)),
    };
    let oauth = fleet.log_in(&exe, &configs[0], cluster.as_ref()).await?;
    let mut rotators = Vec::new();
    for index in 0..opts.rotators {
        let (listen, control, proxy) = (free_port()?, free_port()?, free_port()?);
        // Replicas of the cluster store start from the Secret's seed alone.
        let mut env = fleet.env(
            (cluster.is_none() && !oauth).then_some(bootstrap.as_str()),
            configs[index % configs.len()].clone(),
            [listen, control, proxy],
            format!("soak-{index}"),
        );
        if let Some(c) = &cluster {
            env.extend(c.replica_env());
        }
        let log = out.join(format!("rotator-{index}.log"));
        rotators.push(RotatorProc::launch(index, env, [control, proxy], log, &exe).await?);
    }
    let (metadata_urls, proxy_urls, control_urls) = rotator_urls(&rotators, &control_secret);

    // A neighbour: another rotator on another profile of the same file, with the default
    // identity (no PAT_INSTANCE), its own reader, judged like the others. Neither may ever
    // revoke the other's tokens.
    let mut profiles: Vec<(PathBuf, String)> = configs
        .iter()
        .map(|c| (c.clone(), "DEFAULT".to_string()))
        .collect();
    if cluster.is_none() {
        let index = rotators.len();
        let (listen, control, proxy) = (free_port()?, free_port()?, free_port()?);
        let mut env = fleet.env(
            Some(bootstrap.as_str()),
            configs[0].clone(),
            [listen, control, proxy],
            String::new(),
        );
        // The neighbour keeps a PAT whatever the others keep.
        env.retain(|(k, _)| {
            k != "PAT_INSTANCE" && k != "PAT_CREDENTIAL" && !k.starts_with("DATABRICKS_CLIENT_")
        });
        env.push(("DATABRICKS_CONFIG_PROFILE".into(), NEIGHBOUR_PROFILE.into()));
        let log = out.join(format!("rotator-{index}-neighbour.log"));
        rotators.push(RotatorProc::launch(index, env, [control, proxy], log, &exe).await?);
        profiles.push((configs[0].clone(), NEIGHBOUR_PROFILE.into()));
    }

    let lines: Arc<Mutex<Vec<ReaderLine>>> = Arc::new(Mutex::new(Vec::new()));
    let readers = start_readers(
        opts,
        &exe,
        &ReaderTargets {
            configs: &configs,
            host: &host,
            metadata_urls: &metadata_urls,
            proxy_urls: &proxy_urls,
            neighbour: cluster.is_none(),
        },
        &lines,
    )?;

    Ok(Rig {
        exe,
        out,
        profiles,
        neighbour_instance: (cluster.is_none())
            .then(|| crate::config::instance_for(&configs[0], NEIGHBOUR_PROFILE)),
        cluster,
        emulator,
        started_at,
        t0,
        start,
        rotators,
        readers,
        lines,
        control_urls,
    })
}

/// What every rotator of the soak has in its environment: the compressed settings, the
/// workspace, the one capability, the soak's token comment.
struct Fleet<'a> {
    opts: &'a SoakOptions,
    host: &'a str,
    control_secret: &'a crate::secret::ControlSecret,
    oauth: Option<crate::config::ChildOAuth>,
}

impl Fleet<'_> {
    /// With a U2M credential, the login the rotators share (made before they start);
    /// whether the fleet keeps an OAuth credential.
    async fn log_in(
        &self,
        exe: &Path,
        config: &Path,
        cluster: Option<&super::cluster::ClusterRig>,
    ) -> Result<bool, SoakError> {
        if self.opts.credential == super::oauth::SoakCredential::U2m {
            let mut env = self.env(None, config.to_path_buf(), [0, 0, 0], "soak-login".into());
            // Under the cluster store the login goes into the Secret.
            env.extend(cluster.into_iter().flat_map(|c| c.replica_env()));
            super::oauth::log_in(exe, &env).await?;
        }
        Ok(self.oauth.is_some())
    }

    /// One rotator's environment: its bootstrap token (none for a replica of the cluster
    /// store, which starts from the Secret's seed), config file, ports (public, control,
    /// proxy) and identity.
    fn env(
        &self,
        bootstrap: Option<&str>,
        config_file: PathBuf,
        ports: [u16; 3],
        instance: String,
    ) -> Vec<(String, String)> {
        let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        crate::config::ChildEnv {
            host: self.host.to_string(),
            bootstrap: bootstrap.map(crate::Token::new),
            config_file,
            lifetime: Duration::from_secs(self.opts.lifetime),
            interval: Duration::from_secs(self.opts.interval),
            grace: Duration::from_secs(self.opts.grace),
            http_timeout: Duration::from_secs(HTTP_TIMEOUT),
            listen: loopback(ports[0]),
            control_listen: loopback(ports[1]),
            proxy_listen: Some(loopback(ports[2])),
            control_secret: Some(self.control_secret.clone()),
            session_ttl: Some(Duration::from_secs(30)),
            token_comment: Some(SOAK_COMMENT.into()),
            instance,
            oauth: self.oauth.clone(),
        }
        .vars()
    }
}

/// The config files the rotators keep, emptied of a previous run's: one shared file (file
/// store), or one per replica in its own directory, as each pod has its own (cluster store).
fn config_files(opts: &SoakOptions, out: &Path) -> Result<Vec<PathBuf>, SoakError> {
    let config = out.join("databrickscfg");
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(out.join("databrickscfg.pat-rotator.json"));
    if !opts.kubernetes {
        return Ok(vec![config]);
    }
    (0..opts.rotators)
        .map(|i| {
            let dir = out.join(format!("replica-{i}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map(|_| dir.join("databrickscfg"))
        })
        .collect::<Result<_, _>>()
        .map_err(setup("cannot create a replica's directory"))
}

/// Each rotator's metadata, proxy and control URLs (the first two carry the capability).
fn rotator_urls(
    rotators: &[RotatorProc],
    control_secret: &crate::secret::ControlSecret,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let metadata_urls: Vec<String> = rotators
        .iter()
        .map(|r| {
            crate::server::metadata_url(
                std::net::SocketAddr::from(([127, 0, 0, 1], r.control)),
                control_secret,
            )
        })
        .collect();
    let proxy_urls: Vec<String> = rotators
        .iter()
        .map(|r| {
            crate::proxy::proxy_url(
                std::net::SocketAddr::from(([127, 0, 0, 1], r.proxy)),
                control_secret,
            )
        })
        .collect();
    let control_urls: Vec<String> = rotators
        .iter()
        .map(|r| format!("http://127.0.0.1:{}", r.control))
        .collect();
    (metadata_urls, proxy_urls, control_urls)
}

/// The report folder (`--out`, or a new `soak-<time>` here), emptied of a previous run's
/// config and state, as an absolute path (the rotators run elsewhere).
fn report_folder(opts: &SoakOptions) -> Result<PathBuf, SoakError> {
    let out = match &opts.out {
        Some(p) => p.clone(),
        None => PathBuf::from(format!(
            "soak-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        )),
    };
    std::fs::create_dir_all(&out).map_err(|e| SoakError::Report {
        path: out.clone(),
        source: e,
    })?;
    let out = std::fs::canonicalize(&out).map_err(|e| SoakError::Report {
        path: out.clone(),
        source: e,
    })?;
    Ok(out)
}

/// The workspace the soak runs against: `--host` with `DATABRICKS_TOKEN`, or the embedded
/// emulator; its URL and the bootstrap token.
async fn workspace(
    opts: &SoakOptions,
) -> Result<(Option<RunningEmulator>, String, String), SoakError> {
    Ok(match &opts.host {
        Some(h) => {
            let token = std::env::var("DATABRICKS_TOKEN")
                .map_err(|_| SoakError::Setup("--host needs a token in DATABRICKS_TOKEN".into()))?;
            (None, crate::config::normalize_host(h), token)
        }
        None => {
            // Azure Databricks rejects tokens in their last 30 s, half the default threshold: scaled alike.
            let (emu, boot) = Emulator::new(Options {
                reject_expiring_within: near_expiry_margin(opts).as_secs().max(1),
                oauth: super::oauth::settings(opts.lifetime),
                ..Options::default()
            });
            let running = emu
                .spawn("127.0.0.1:0".parse().map_err(setup("address"))?)
                .await
                .map_err(setup("cannot start the emulator"))?;
            let url = running.url();
            (Some(running), url, boot.expose().to_string())
        }
    })
}

/// What the readers read from: the config files, the workspace, every rotator's metadata
/// and proxy URLs, and whether a neighbour profile shares the file (file store).
struct ReaderTargets<'a> {
    configs: &'a [PathBuf],
    host: &'a str,
    metadata_urls: &'a [String],
    proxy_urls: &'a [String],
    neighbour: bool,
}

/// Readers: every kind takes part, taken in turn (file, metadata endpoint, proxy), and the
/// neighbour's own reader.
fn start_readers(
    opts: &SoakOptions,
    exe: &Path,
    t: &ReaderTargets<'_>,
    lines: &Arc<Mutex<Vec<ReaderLine>>>,
) -> Result<Vec<Child>, SoakError> {
    let mut readers: Vec<Child> = Vec::new();
    for index in 0..opts.readers {
        let mode = ["file", "metadata", "proxy"][index % 3];
        let mut cmd = Command::new(exe);
        cmd.args([
            "soak-reader",
            "--index",
            &index.to_string(),
            "--config",
            &t.configs[index % t.configs.len()].display().to_string(),
            "--host",
            t.host,
            "--mode",
            mode,
            "--every-ms",
            &READER_POLL_MS.to_string(),
        ]);
        // The URLs carry the capability: in the environment (readable by this user only),
        // never on a command line that every local user can read in `ps`.
        cmd.env("PAT_SOAK_METADATA_URLS", t.metadata_urls.join(" "))
            .env("PAT_SOAK_PROXY_URLS", t.proxy_urls.join(" "));
        if let Some(c) = opts.reader_cache {
            cmd.args(["--cache-for", &c.to_string()]);
        }
        readers.push(spawn_reader(cmd, lines)?);
    }
    if t.neighbour {
        // The neighbour's reader: its profile of the shared file.
        let mut cmd = Command::new(exe);
        cmd.args([
            "soak-reader",
            "--index",
            &opts.readers.to_string(),
            "--config",
            &t.configs[0].display().to_string(),
            "--profile",
            NEIGHBOUR_PROFILE,
            "--host",
            t.host,
            "--mode",
            "file",
            "--every-ms",
            &READER_POLL_MS.to_string(),
        ]);
        readers.push(spawn_reader(cmd, lines)?);
    }
    Ok(readers)
}

/// Starts a reader process and collects the lines it prints.
fn spawn_reader(mut cmd: Command, lines: &Arc<Mutex<Vec<ReaderLine>>>) -> Result<Child, SoakError> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(setup("cannot start a reader"))?;
    if let Some(stdout) = child.stdout.take() {
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut rd = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = rd.next_line().await {
                if let Ok(parsed) = serde_json::from_str::<ReaderLine>(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(parsed);
                }
            }
        });
    }
    Ok(child)
}

pub(super) struct RotatorProc {
    pub(super) index: usize,
    pub(super) env: Vec<(String, String)>,
    pub(super) control: u16,
    pub(super) proxy: u16,
    pub(super) log: PathBuf,
    pub(super) child: Option<Child>,
    pub(super) cpu_seconds: f64,
    pub(super) max_rss_kib: u64,
    /// What its processes said they sent the API server (cluster store), scraped before
    /// each kill and stop.
    pub(super) kube_requests: super::cluster::KubeRequests,
}

impl RotatorProc {
    /// Starts rotator `index` with `env` (whose control and proxy ports are `ports`),
    /// logging to `log`, and waits until it listens.
    async fn launch(
        index: usize,
        env: Vec<(String, String)>,
        ports: [u16; 2],
        log: PathBuf,
        exe: &Path,
    ) -> Result<RotatorProc, SoakError> {
        let _ = std::fs::remove_file(&log);
        let mut r = RotatorProc {
            index,
            env,
            control: ports[0],
            proxy: ports[1],
            log,
            child: None,
            cpu_seconds: 0.0,
            max_rss_kib: 0,
            kube_requests: Default::default(),
        };
        r.spawn_listening(exe, true).await?;
        Ok(r)
    }

    /// The ports of its three listeners (health, control, proxy).
    pub(super) fn ports(&self) -> Vec<u16> {
        let health = self
            .env
            .iter()
            .find(|(k, _)| k == "PAT_LISTEN")
            .and_then(|(_, v)| v.rsplit(':').next()?.parse().ok());
        health
            .into_iter()
            .chain([self.control, self.proxy])
            .collect()
    }

    pub(super) fn spawn(&mut self, exe: &Path) -> Result<(), SoakError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(setup("cannot open a rotator log"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().map_err(setup("cannot start a rotator"))?);
        Ok(())
    }

    /// Starts the rotator and waits until its control listener answers. A port chosen by
    /// [`free_port`] can be taken by another process before the rotator binds it: then,
    /// when `repick` (the first start, before any reader knows the ports), new ports are
    /// chosen and it starts again. A rotator that does not come up is a setup error, never
    /// a silent gap in the soak.
    pub(super) async fn spawn_listening(
        &mut self,
        exe: &Path,
        repick: bool,
    ) -> Result<(), SoakError> {
        for _ in 0..5 {
            self.spawn(exe)?;
            let started = Instant::now();
            while started.elapsed() < LISTEN_WAIT {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.control))
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
                let exited = self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if !(repick && log.contains("Address already in use")) {
                break;
            }
            let (listen, control, proxy) = (free_port()?, free_port()?, free_port()?);
            for (k, v) in &mut self.env {
                match k.as_str() {
                    "PAT_LISTEN" => *v = format!("127.0.0.1:{listen}"),
                    "PAT_CONTROL_LISTEN" => *v = format!("127.0.0.1:{control}"),
                    "PAT_PROXY_LISTEN" => *v = format!("127.0.0.1:{proxy}"),
                    _ => {}
                }
            }
            self.control = control;
            self.proxy = proxy;
        }
        Err(SoakError::Setup(format!(
            "rotator {} did not come up (its control listener never answered); see {}",
            self.index,
            self.log.display()
        )))
    }

    /// Gives the next start another `PAT_INSTANCE` (a new pod, as a Deployment would make).
    pub(super) fn rename(&mut self, instance: &str) {
        for (k, v) in &mut self.env {
            if k == "PAT_INSTANCE" {
                *v = instance.to_string();
            }
        }
    }

    /// Adds this process's CPU time and resident memory to the totals (from /proc).
    fn sample(&mut self) {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            self.cpu_seconds += (ticks(11) + ticks(12)) / hz;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            self.max_rss_kib = self.max_rss_kib.max(rss);
        }
    }

    pub(super) async fn kill9(&mut self) {
        self.sample();
        self.sample_kube_requests().await;
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGTERM and wait; `false` when it did not exit 0 within 15 s.
    pub(super) async fn terminate(&mut self) -> bool {
        self.sample();
        self.sample_kube_requests().await;
        let Some(mut c) = self.child.take() else {
            return true;
        };
        if let Some(pid) = c.id() {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(15), c.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = c.start_kill();
                false
            }
        }
    }
}
