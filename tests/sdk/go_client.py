"""The official Databricks SDK for Go as a real client of pat-rotator.

Builds tests/go (the SDK pinned in its go.mod; caches under target/go), starts the emulator
and a rotator (compressed lifetimes), and runs, side by side across at least 4 rotations:
1. one long-lived client on the metadata-service endpoint;
2. a client built from the rotated config file for each call.
Each must see 0 errors, and the emulator 0 requests with a revoked or expired token.

Usage: python go_client.py PATH_TO_PAT_ROTATOR_BINARY
"""

import json
import os
import subprocess
import sys
import tempfile

from harness import check_rotations, counters, report, start_emulator, start_rotator, status_json, stop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build():
    target = os.path.join(ROOT, "target", "go")
    env = dict(os.environ, GOPATH=target, GOMODCACHE=os.path.join(target, "mod"),
               GOCACHE=os.path.join(target, "cache"), GOFLAGS="-mod=readonly", CGO_ENABLED="0")
    out = os.path.join(target, "go-client")
    subprocess.run(["go", "build", "-o", out, "."], cwd=os.path.join(ROOT, "tests", "go"), env=env, check=True)
    return out


def main():
    binary = os.path.abspath(sys.argv[1])
    client = build()
    work = tempfile.mkdtemp(prefix="pat-rotator-go-")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    procs = []
    failures = []
    try:
        emu_url, bootstrap = start_emulator(binary, work, base_env, procs)
        rotator_env, cfg = start_rotator(binary, work, base_env, procs, emu_url, bootstrap, "go-test")
        metadata_url = status_json(binary, rotator_env)["metadata_url"]
        creates = counters(emu_url)["creates"]
        clean = {"PATH": os.environ.get("PATH", ""), "HOME": work}
        runs = [
            subprocess.Popen([client, "-mode", "metadata", "-host", emu_url, "-metadata-url", metadata_url, "-seconds", "22"],
                             env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            subprocess.Popen([client, "-mode", "file", "-config", cfg, "-seconds", "22"],
                             env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        ]
        for run in runs:
            out, err = run.communicate(timeout=120)
            line = out.strip().splitlines()[-1] if out.strip() else "{}"
            r = json.loads(line)
            print(f"go sdk, {r.get('mode')}: {r.get('calls')} calls, {r.get('errors')} errors")
            if run.returncode != 0 or r.get("errors", 1) != 0 or r.get("calls", 0) < 40:
                failures.append(f"{r.get('mode')}: {r} {err[-500:]}")
        check_rotations(emu_url, creates, failures)
    finally:
        stop(procs)
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
