//! Helpers shared by the integration tests: the real binary, free ports, child processes.
#![allow(dead_code)]

pub mod envtest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pat-rotator"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment of a rotator process with compressed settings.
pub struct RotatorEnv {
    pub vars: Vec<(String, String)>,
    pub listen: u16,
    pub control: u16,
    /// A command the binary runs under (`prlimit --nofile=...`), if any.
    pub wrapper: Vec<String>,
}

impl RotatorEnv {
    pub fn new(
        host: &str,
        bootstrap: Option<&str>,
        config: &Path,
        lifetime: u64,
        interval: u64,
        grace: u64,
    ) -> Self {
        let (listen, control) = (free_port(), free_port());
        let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let secs = Duration::from_secs;
        let vars = pat_rotator::config::ChildEnv {
            host: host.to_string(),
            bootstrap: bootstrap.map(pat_rotator::Token::new),
            config_file: config.to_path_buf(),
            lifetime: secs(lifetime),
            interval: secs(interval),
            grace: secs(grace),
            http_timeout: secs(2),
            listen: loopback(listen),
            control_listen: loopback(control),
            proxy_listen: None,
            control_secret: None,
            session_ttl: None,
            token_comment: None,
            instance: "itest".into(),
            oauth: None,
        }
        .vars();
        RotatorEnv {
            vars,
            listen,
            control,
            wrapper: Vec::new(),
        }
    }

    pub fn unset(&mut self, key: &str) {
        self.vars.retain(|(k, _)| k != key);
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", "/nonexistent");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Starts `pat-rotator run`, logging to `log`, without waiting for anything.
    fn spawn_child(&self, log: &Path) -> Child {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        self.command(&["run"])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap()
    }

    /// Starts `pat-rotator run`, logging to `log`, and waits until its listeners are bound.
    /// `free_port` can only pick a port, not hold it: when another process took one
    /// meanwhile and the rotator exits at start, new ports are picked and it starts again.
    pub fn spawn_run(&mut self, log: &Path) -> Child {
        const BOUND: &str = "serving health, metrics, sessions";
        for _ in 0..5 {
            let seen = std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches(BOUND)
                .count();
            let mut child = self.spawn_child(log);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                if text.matches(BOUND).count() > seen {
                    return child;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !matches!(child.try_wait(), Ok(Some(_))) {
                return child;
            }
            self.listen = free_port();
            self.control = free_port();
            self.set("PAT_LISTEN", &format!("127.0.0.1:{}", self.listen));
            self.set("PAT_CONTROL_LISTEN", &format!("127.0.0.1:{}", self.control));
            if self.vars.iter().any(|(k, _)| k == "PAT_PROXY_LISTEN") {
                self.set("PAT_PROXY_LISTEN", &format!("127.0.0.1:{}", free_port()));
            }
        }
        panic!(
            "pat-rotator run kept exiting at start; see {}",
            log.display()
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen)
    }

    /// `DATABRICKS_CONFIG_FILE` of this rotator.
    pub fn config_path(&self) -> PathBuf {
        self.vars
            .iter()
            .find(|(k, _)| k == "DATABRICKS_CONFIG_FILE")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap()
    }

    /// The metadata URL as a user finds it: `status --json` (from `<config>.control.json`).
    pub fn published_metadata_url(&self) -> String {
        let out = self.command(&["status", "--json"]).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["metadata_url"]
            .as_str()
            .unwrap_or_else(|| panic!("no metadata_url in status --json: {json}"))
            .to_string()
    }

    /// The Prometheus text of this rotator's `/metrics`.
    pub async fn metrics(&self) -> String {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        http.get(self.url("/metrics"))
            .send()
            .await
            .expect("/metrics did not answer within 10 s")
            .text()
            .await
            .unwrap()
    }

    pub fn control_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.control)
    }
}

pub fn sigterm(child: &Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

pub fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for `child` to exit, at most `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Polls `f` every 100 ms until it is true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The status `url` answers with, if it answers within 5 s (a wedged listener is a failure
/// to see, not a test that hangs).
pub async fn http_status(url: &str) -> Option<u16> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

pub fn install_crypto() {
    pat_rotator::provider::install_crypto_provider();
}

/// The embedded emulator on a free loopback port, and its bootstrap token.
pub async fn start_emulator(
    options: pat_rotator::emulator::Options,
) -> (pat_rotator::emulator::RunningEmulator, pat_rotator::Token) {
    install_crypto();
    let (emu, bootstrap) = pat_rotator::emulator::Emulator::new(options);
    (
        emu.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap(),
        bootstrap,
    )
}

/// The set-up nearly every test starts from: the embedded emulator, a private directory,
/// and the path of a config file in it (not created).
#[allow(dead_code)]
pub struct Fixture {
    pub emu: pat_rotator::emulator::RunningEmulator,
    pub boot: pat_rotator::Token,
    pub dir: tempfile::TempDir,
    pub cfg: PathBuf,
}

#[allow(dead_code)]
impl Fixture {
    pub async fn new(options: pat_rotator::emulator::Options) -> Fixture {
        let (emu, boot) = start_emulator(options).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("databrickscfg");
        Fixture {
            emu,
            boot,
            dir,
            cfg,
        }
    }

    /// An emulator that refuses tokens in their last `seconds` (as Azure does).
    pub async fn rejecting(seconds: u64) -> Fixture {
        Fixture::new(pat_rotator::emulator::Options {
            reject_expiring_within: seconds,
            ..Default::default()
        })
        .await
    }

    /// The emulator, the bootstrap token, the directory and the config path, for a test that
    /// uses them by name.
    pub fn into_parts(
        self,
    ) -> (
        pat_rotator::emulator::RunningEmulator,
        pat_rotator::Token,
        tempfile::TempDir,
        PathBuf,
    ) {
        (self.emu, self.boot, self.dir, self.cfg)
    }

    /// A rotator's environment on this fixture's emulator and file, with the bootstrap token.
    pub fn rotator(&self, lifetime: u64, interval: u64, grace: u64) -> RotatorEnv {
        RotatorEnv::new(
            &self.emu.url(),
            Some(self.boot.expose()),
            &self.cfg,
            lifetime,
            interval,
            grace,
        )
    }

    /// Starts `env` (logging to `run.log` in the directory) and waits until it is ready; the
    /// rotator is killed when the result is dropped.
    pub async fn start(self, mut env: RotatorEnv) -> Running {
        let child = env.spawn_run(&self.dir.path().join("run.log"));
        assert!(
            status_becomes(&env.url("/readyz"), 200, Duration::from_secs(15)).await,
            "the rotator did not become ready; see {}",
            self.dir.path().join("run.log").display()
        );
        let Fixture {
            emu,
            boot,
            dir,
            cfg,
        } = self;
        Running {
            emu,
            boot,
            dir,
            cfg,
            env,
            child,
        }
    }
}

/// A ready rotator on a fixture, killed when dropped.
#[allow(dead_code)]
pub struct Running {
    pub emu: pat_rotator::emulator::RunningEmulator,
    pub boot: pat_rotator::Token,
    pub dir: tempfile::TempDir,
    pub cfg: PathBuf,
    pub env: RotatorEnv,
    pub child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `limit` for `url` to answer `code`.
pub async fn status_becomes(url: &str, code: u16, limit: Duration) -> bool {
    eventually(limit, async || http_status(url).await == Some(code)).await
}

/// Runs `cmd` with `input` on its stdin (how a token reaches `pat-rotator set`).
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Whether `tool` can be used. `scripts/test.sh` (which installs the tools) sets
/// `PAT_REQUIRE_HOSTILE_TOOLS`, so a missing one fails there; a developer running one test by
/// hand is told loudly that it was skipped.
#[allow(dead_code)]
pub fn require_tool(tool: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("PAT_REQUIRE_HOSTILE_TOOLS").is_some() {
        panic!("{tool} is required (scripts/test.sh installs it)");
    }
    eprintln!("SKIPPED: {tool} is not installed; this test did not run");
    false
}

/// Fails when `text` (a log) holds a token value the embedded emulator minted (`dapi` and 32
/// hex digits: every token it mints has this form, so no list of values is needed) or any
/// of `secrets` (a control secret).
#[allow(dead_code)]
pub fn assert_no_secrets(what: &str, text: &str, secrets: &[&str]) {
    let leaked_token = text.match_indices("dapi").any(|(i, _)| {
        let rest = text.as_bytes().get(i + 4..i + 36);
        rest.is_some_and(|r| r.iter().all(u8::is_ascii_hexdigit))
    });
    assert!(!leaked_token, "{what}: a token value appears");
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(!text.contains(s), "{what}: the control secret appears");
    }
}
