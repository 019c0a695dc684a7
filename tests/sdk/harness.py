"""What the real-client checks share: free ports, waiting for a URL, the emulator's
counters, and starting the emulator and a rotator (the real binary) for them."""

import json
import os
import socket
import subprocess
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} never answered 200")


def counters(emu_url):
    with urllib.request.urlopen(f"{emu_url}/emulator/counters", timeout=5) as r:
        return json.load(r)


def check_no_dead_tokens(emu_url, failures):
    """The emulator's verdict: no request may have used a revoked or expired token."""
    final = counters(emu_url)
    dead = final["dead_token_requests"]
    print(f"emulator: {final['creates']} creates, {dead} requests with a dead token")
    if dead:
        failures.append(f"{dead} requests were made with a revoked or expired token")


def start_emulator(binary, work, env, procs):
    """Starts `pat-rotator emulate`; returns its URL and bootstrap token."""
    port = free_port()
    token_file = os.path.join(work, "bootstrap")
    procs.append(subprocess.Popen(
        [binary, "emulate", "--listen", f"127.0.0.1:{port}", "--token-file", token_file, "--reject-expiring-within", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 10
    while not os.path.exists(token_file) and time.time() < deadline:
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", open(token_file).read().strip()


def start_rotator(binary, work, base_env, procs, emu_url, bootstrap, instance, wait=True, log="rotator.log", **settings):
    """Starts `pat-rotator run` on the emulator with compressed lifetimes (8 s, interval 4 s,
    grace 2 s unless `settings` say otherwise; any PAT_* may be given), its config file in
    `work`, its log in work/`log`, and (with `wait`) waits until it is ready. Returns its
    environment (for `status --json` and the like) and the config file."""
    os.makedirs(work, exist_ok=True)
    cfg = os.path.join(work, "databrickscfg")
    listen = free_port()
    env = dict(base_env,
               DATABRICKS_HOST=emu_url, DATABRICKS_TOKEN=bootstrap, DATABRICKS_CONFIG_FILE=cfg,
               PAT_TOKEN_LIFETIME="8", PAT_ROTATION_INTERVAL="4", PAT_REVOKE_GRACE="2",
               PAT_HTTP_TIMEOUT="2", PAT_WRITE_LOCK_WAIT="3",
               PAT_LISTEN=f"127.0.0.1:{listen}", PAT_CONTROL_LISTEN=f"127.0.0.1:{free_port()}",
               PAT_INSTANCE=instance, RUST_LOG="warn")
    env.update(settings)
    log = open(os.path.join(work, log), "w")
    procs.append(subprocess.Popen([binary, "run"], env=env, stdout=subprocess.DEVNULL, stderr=log))
    if wait:
        wait_for(f"http://127.0.0.1:{listen}/readyz")
    return env, cfg


def status_json(binary, env):
    """`pat-rotator status --json`: where a user finds the service's URLs."""
    out = subprocess.run([binary, "status", "--json"], env=env, capture_output=True, text=True)
    return json.loads(out.stdout)


def stop(procs):
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def check_rotations(emu_url, creates_before, failures, at_least=4):
    """At least `at_least` rotations since `creates_before`, and no request with a dead token."""
    rotations = counters(emu_url)["creates"] - creates_before
    print(f"across {rotations} rotations")
    if rotations < at_least:
        failures.append(f"only {rotations} rotations during the run")
    check_no_dead_tokens(emu_url, failures)


def report(failures):
    """Prints each failure; the exit status."""
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0
