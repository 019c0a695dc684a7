//! A real Kubernetes API server for the cluster-store tests: `../shared/envtest/start.sh`
//! (kube-apiserver + etcd on loopback), stopped when dropped. The API server can be stopped
//! and started again with the same arguments (an outage that the replicas see as refused
//! connections), its data kept in etcd.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Envtest {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    /// The API server's command line, kept while it is stopped.
    stopped: Option<Vec<String>>,
    /// The API server started again by `resume_apiserver`, reaped at drop.
    resumed: Option<std::process::Child>,
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/envtest")
}

impl Envtest {
    /// Starts one, or says why it cannot in one line and returns `None` (a failure when
    /// `PAT_REQUIRE_ENVTEST=1`, as in `scripts/test.sh`).
    pub fn start() -> Option<Envtest> {
        let start = scripts().join("start.sh");
        if !start.exists() {
            let why = format!(
                "cluster tests need a Kubernetes API server: put the shared envtest at {} (its setup.sh prints the value for KUBEBUILDER_ASSETS)",
                scripts().display()
            );
            assert!(std::env::var("PAT_REQUIRE_ENVTEST").is_err(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(&start)
            .arg(dir.path())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "envtest start.sh failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let kubeconfig = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("KUBECONFIG="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no KUBECONFIG in start.sh output: {text}"));
        Some(Envtest {
            dir,
            kubeconfig,
            stopped: None,
            resumed: None,
        })
    }

    /// `kubectl proxy` on a free loopback port, as the admin: plain HTTP to the API server
    /// for writes faster than a `kubectl` per write can make. The child is the caller's to
    /// kill; the URL is `http://127.0.0.1:<port>`.
    pub fn proxy(&self) -> (std::process::Child, String) {
        use std::io::BufRead;
        let mut child = Command::new("kubectl")
            .args(["proxy", "--port=0", "--address=127.0.0.1"])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        // "Starting to serve on 127.0.0.1:PORT"
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(addr.contains(':'), "kubectl proxy said: {line}");
        (child, format!("http://{addr}"))
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap()
    }

    /// `kubectl` that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies a manifest given as text.
    pub fn apply(&self, manifest: &str) {
        let path = self.dir.path().join("manifest.yaml");
        std::fs::write(&path, manifest).unwrap();
        self.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    }

    /// Creates the Secret `name` with these keys. The values go through 0600 files, never a
    /// command line (which every local user can read in `ps`).
    pub fn create_secret(&self, name: &str, data: &[(&str, &str)]) {
        let mut args = vec![
            "create".to_string(),
            "secret".into(),
            "generic".into(),
            name.into(),
        ];
        for (key, value) in data {
            let path = self.dir.path().join(format!("{name}.{key}"));
            pat_rotator::store::atomic_write_private(&path, value.as_bytes()).unwrap();
            args.push(format!("--from-file={key}={}", path.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.kubectl_ok(&args);
    }

    /// The token the Secret holds, if any.
    pub fn secret_token(&self, name: &str) -> Option<pat_rotator::Token> {
        let template = r#"go-template={{index .data "token" | base64decode}}"#;
        let out = self.kubectl(&["get", "secret", name, "-o", template]);
        let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !value.is_empty()).then(|| pat_rotator::Token::new(value))
    }

    /// The Lease's holder, if any.
    pub fn lease_holder(&self, name: &str) -> Option<String> {
        let out = self.kubectl(&[
            "get",
            "lease",
            name,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
            .filter(|h| out.status.success() && !h.is_empty())
    }

    /// The Lease's holder and when that holder acquired it (`spec.acquireTime`, written by
    /// the holder itself): a takeover measured from the record, not from how often a test
    /// manages to spawn kubectl on a loaded machine.
    pub fn lease_acquired(&self, name: &str) -> Option<(String, chrono::DateTime<chrono::Utc>)> {
        let out = self.kubectl(&[
            "get",
            "lease",
            name,
            "-o",
            "jsonpath={.spec.holderIdentity} {.spec.acquireTime}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (holder, at) = text.trim().split_once(' ')?;
        let at = chrono::DateTime::parse_from_rfc3339(at).ok()?;
        (out.status.success() && !holder.is_empty())
            .then(|| (holder.to_string(), at.with_timezone(&chrono::Utc)))
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("apiserver.pid")
    }

    fn apiserver_pid(&self) -> i32 {
        std::fs::read_to_string(self.pid_file())
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Freezes the API server (`SIGSTOP`): connections stay open, nothing answers (a hung
    /// server or a partition, unlike a crash, which resets them) until [`Envtest::thaw`].
    pub fn freeze(&self) {
        assert_eq!(
            unsafe { libc::kill(self.apiserver_pid(), libc::SIGSTOP) },
            0
        );
    }

    pub fn thaw(&self) {
        assert_eq!(
            unsafe { libc::kill(self.apiserver_pid(), libc::SIGCONT) },
            0
        );
    }

    /// Stops the API server process (connections are refused until `resume`).
    pub fn stop_apiserver(&mut self) {
        let pid = self.apiserver_pid();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        let start = Instant::now();
        while Path::new(&format!("/proc/{pid}/stat")).exists()
            && start.elapsed() < Duration::from_secs(10)
        {
            // A zombie until start.sh's shell reaps it; its port is closed already.
            if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stopped = Some(args);
    }

    /// Starts the API server again with the same arguments and waits until it answers.
    pub fn resume_apiserver(&mut self) {
        let args = self.stopped.take().expect("the API server was not stopped");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.path().join("apiserver.log"))
            .unwrap();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(self.pid_file(), child.id().to_string()).unwrap();
        self.resumed = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.kubectl(&["get", "--raw", "/readyz"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the API server did not come back within 30 s");
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts().join("stop.sh"))
            .arg(self.dir.path())
            .output();
        if let Some(mut child) = self.resumed.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
