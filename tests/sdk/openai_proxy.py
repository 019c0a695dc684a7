"""The official `openai` Python client through pat-rotator's authenticating proxy.

A client configured once with a base URL and a dummy API key (as coding agents and LLM
tools are) streams chat completions continuously from the emulator's Databricks model
serving route through the proxy, across at least five rotations (lifetime 10 s, interval
5 s, grace 2 s). Every stream must complete (all chunks, the finish chunk, and the
emulator's final [DONE]), no call may fail, and the emulator must have seen no request with
a revoked or expired token.

Usage: python openai_proxy.py PATH_TO_PAT_ROTATOR_BINARY
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from openai import OpenAI

CHUNKS = 5


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


def main():
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="pat-rotator-openai-")
    cfg = os.path.join(work, "databrickscfg")
    token_file = os.path.join(work, "bootstrap")
    emu_port, listen, control, proxy = free_port(), free_port(), free_port(), free_port()
    emu_url = f"http://127.0.0.1:{emu_port}"
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    procs, failures = [], []
    try:
        procs.append(subprocess.Popen(
            [binary, "emulate", "--listen", f"127.0.0.1:{emu_port}", "--token-file", token_file, "--reject-expiring-within", "1"],
            env=base_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 10
        while not os.path.exists(token_file) and time.time() < deadline:
            time.sleep(0.1)
        rotator_env = dict(base_env,
                           DATABRICKS_HOST=emu_url, DATABRICKS_TOKEN=open(token_file).read().strip(),
                           DATABRICKS_CONFIG_FILE=cfg,
                           PAT_TOKEN_LIFETIME="10", PAT_ROTATION_INTERVAL="5", PAT_REVOKE_GRACE="2",
                           PAT_HTTP_TIMEOUT="2", PAT_WRITE_LOCK_WAIT="3",
                           PAT_LISTEN=f"127.0.0.1:{listen}", PAT_CONTROL_LISTEN=f"127.0.0.1:{control}",
                           PAT_PROXY_LISTEN=f"127.0.0.1:{proxy}", PAT_INSTANCE="openai-test", RUST_LOG="warn")
        log = open(os.path.join(work, "rotator.log"), "w")
        procs.append(subprocess.Popen([binary, "run"], env=rotator_env, stdout=subprocess.DEVNULL, stderr=log))
        wait_for(f"http://127.0.0.1:{listen}/readyz")
        status = subprocess.run([binary, "status", "--json"], env=rotator_env, capture_output=True, text=True)
        proxy_url = json.loads(status.stdout)["proxy_url"]
        client = OpenAI(base_url=proxy_url + "serving-endpoints", api_key="dummy-the-proxy-replaces-it", max_retries=0)

        start = counters(emu_url)
        streams, lock = [], threading.Lock()

        def stream_forever(deadline):
            while time.time() < deadline:
                try:
                    words, finish = [], None
                    for chunk in client.chat.completions.create(
                            model="databricks-claude-sonnet-4-5", stream=True,
                            messages=[{"role": "user", "content": "count"}]):
                        for choice in chunk.choices:
                            if choice.delta.content:
                                words.append(choice.delta.content.strip())
                            finish = choice.finish_reason or finish
                    ok = words == [f"word{i}" for i in range(CHUNKS)] and finish == "stop"
                    with lock:
                        streams.append(ok)
                        if not ok:
                            failures.append(f"stream incomplete: {words} finish={finish}")
                except Exception as e:  # noqa: BLE001 - every error is a failure to report
                    with lock:
                        streams.append(False)
                        failures.append(f"stream error: {e!r}")

        deadline = time.time() + 32
        threads = [threading.Thread(target=stream_forever, args=(deadline,)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = counters(emu_url)
        rotations = end["creates"] - start["creates"]
        completed = end["streams_completed"] - start["streams_completed"]
        print(f"openai client through the proxy: {len(streams)} streams across {rotations} rotations, "
              f"{sum(streams)} complete, {completed} sent [DONE], {len(failures)} errors")
        if rotations < 5:
            failures.append(f"only {rotations} rotations")
        if completed != len(streams):
            failures.append(f"{completed} streams ended with [DONE] for {len(streams)} started")
        dead = end["dead_token_requests"]
        print(f"emulator: {dead} requests with a dead token")
        if dead:
            failures.append(f"{dead} requests were made with a revoked or expired token")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    for f in failures[:20]:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
