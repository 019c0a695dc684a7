"""The Databricks CLI as a real client of pat-rotator.

Starts the emulator and a rotator (compressed lifetimes), then runs `databricks current-user
me`, one process per call, for a while in two ways side by side, across at least 4
rotations:
1. from the rotated config file (DATABRICKS_CONFIG_FILE, profile DEFAULT);
2. through the rotator's metadata endpoint (DATABRICKS_METADATA_SERVICE_URL).
Each must see 0 errors, and the emulator 0 requests with a revoked or expired token.

The CLI's Go module is refused by the Go module proxy here (403 on every version's .mod and
.zip), so `scripts/test.sh` cannot build it on a fresh machine; given a built CLI, this runs.

Usage: python cli_client.py PATH_TO_PAT_ROTATOR_BINARY PATH_TO_DATABRICKS_CLI
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from harness import check_rotations, counters, report, start_emulator, start_rotator, status_json, stop

SECONDS = 24


def calls(cli, env, seconds):
    """`databricks current-user me` in a loop; (calls, errors, first error)."""
    n, errors, first = 0, 0, None
    end = time.time() + seconds
    while time.time() < end:
        run = subprocess.run([cli, "current-user", "me", "--output", "json"], env=env,
                             capture_output=True, text=True, timeout=60)
        n += 1
        ok = run.returncode == 0
        if ok:
            try:
                ok = json.loads(run.stdout).get("userName") == "emulated-user@example.com"
            except ValueError:
                ok = False
        if not ok:
            errors += 1
            first = first or (run.stderr or run.stdout)[-300:]
        time.sleep(0.2)
    return n, errors, first


def main():
    binary, cli = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    work = tempfile.mkdtemp(prefix="pat-rotator-cli-")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    procs, failures = [], []
    try:
        emu_url, bootstrap = start_emulator(binary, work, base_env, procs)
        rotator_env, cfg = start_rotator(binary, work, base_env, procs, emu_url, bootstrap, "cli-test")
        metadata_url = status_json(binary, rotator_env)["metadata_url"]
        creates = counters(emu_url)["creates"]
        quiet = {"DATABRICKS_CLI_UPGRADE_CHECK": "false", "DO_NOT_TRACK": "1"}
        ways = {
            "file": dict(base_env, **quiet, DATABRICKS_CONFIG_FILE=cfg, DATABRICKS_CONFIG_PROFILE="DEFAULT"),
            "metadata": dict(base_env, **quiet, DATABRICKS_HOST=emu_url, DATABRICKS_AUTH_TYPE="metadata-service",
                             DATABRICKS_METADATA_SERVICE_URL=metadata_url,
                             DATABRICKS_CONFIG_FILE=os.path.join(work, "none")),
        }
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            results = {way: pool.submit(calls, cli, env, SECONDS) for way, env in ways.items()}
            for way, future in results.items():
                n, errors, first = future.result()
                print(f"databricks cli, {way}: {n} calls, {errors} errors")
                if errors or n < 20:
                    failures.append(f"{way}: {n} calls, {errors} errors, first: {first}")
        check_rotations(emu_url, creates, failures)
    finally:
        stop(procs)
    return report(failures)


if __name__ == "__main__":
    sys.exit(main())
