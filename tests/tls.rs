//! TLS errors name the workspace, the cause and the fix: a local TLS front (Python's `ssl`,
//! certificates made with the `openssl` tool) presents a certificate of an unknown issuer,
//! one for another name, and an expired one. `status --verify` says so, and so does `run` on
//! stderr at start; with `SSL_CERT_FILE` naming the CA, the same front is trusted.

mod common;

use common::RotatorEnv;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A minimal HTTPS server: answers any request with SCIM `Me` (so a trusted front verifies).
const FRONT: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"userName": "tls-user@example.com"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

fn openssl(dir: &Path, args: &[&str], faketime: Option<&str>) {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    if let Some(at) = faketime {
        cmd.env("LD_PRELOAD", FAKETIME).env("FAKETIME", at);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a leaf `name` signed by it (`san`: its subjectAltName), valid from `faketime`'s
/// date when given.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=pat-rotator test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        None,
    );
    for (name, san, when) in [
        ("good", "IP:127.0.0.1,DNS:localhost", None),
        ("wrong", "DNS:wrong.example", None),
        (
            "expired",
            "IP:127.0.0.1,DNS:localhost",
            Some("@2020-01-01 00:00:00"),
        ),
    ] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/CN=pat-rotator test",
            ],
            None,
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
            when,
        );
    }
}

struct Front(Child, u16);

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn front(dir: &Path, leaf: &str) -> Front {
    use std::io::BufRead;
    let port = common::free_port();
    let mut child = Command::new("python3")
        .args(["-c", FRONT, &port.to_string()])
        .arg(dir.join(format!("{leaf}.pem")))
        .arg(dir.join(format!("{leaf}.key")))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Front(child, port)
}

/// `status --verify` against the front with `leaf`, and the output.
fn verify(dir: &Path, front: &Front, ca_file: bool) -> String {
    let cfg = dir.join("databrickscfg");
    std::fs::write(&cfg, "[DEFAULT]\ntoken = dapi-tls-test\n").unwrap();
    let host = format!("https://127.0.0.1:{}", front.1);
    let mut env = RotatorEnv::new(&host, None, &cfg, 20, 8, 3);
    if ca_file {
        env.set("SSL_CERT_FILE", &dir.join("ca.pem").display().to_string());
    }
    let out = env.command(&["status", "--verify"]).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tls_errors_name_the_workspace_the_cause_and_the_fix() {
    if !common::require_tool(
        "openssl",
        Command::new("openssl").arg("version").output().is_ok(),
    ) || !common::require_tool("libfaketime", Path::new(FAKETIME).exists())
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());

    let good = front(dir.path(), "good");
    let text = verify(dir.path(), &good, false);
    assert!(
        text.contains("UnknownIssuer")
            && text.contains("SSL_CERT_FILE")
            && text.contains(&format!("https://127.0.0.1:{}", good.1)),
        "{text}"
    );
    assert!(!text.contains("error sending request"), "{text}");
    // The same front with its CA in SSL_CERT_FILE: trusted.
    let text = verify(dir.path(), &good, true);
    assert!(text.contains("accepted for tls-user@example.com"), "{text}");

    let wrong = front(dir.path(), "wrong");
    let text = verify(dir.path(), &wrong, true);
    assert!(
        text.contains("NotValidForName") && text.contains("DATABRICKS_HOST"),
        "{text}"
    );

    let expired = front(dir.path(), "expired");
    let text = verify(dir.path(), &expired, true);
    assert!(text.contains("has expired"), "{text}");

    // `run` says it on stderr at start.
    let cfg = dir.path().join("databrickscfg");
    let mut env = RotatorEnv::new(
        &format!("https://127.0.0.1:{}", good.1),
        None,
        &cfg,
        20,
        8,
        3,
    );
    let log = dir.path().join("run.log");
    let mut child = env.spawn_run(&log);
    let start = Instant::now();
    let mut said = false;
    while start.elapsed() < Duration::from_secs(15) && !said {
        said = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("UnknownIssuer");
        std::thread::sleep(Duration::from_millis(200));
    }
    common::sigkill(&mut child);
    assert!(
        said,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
