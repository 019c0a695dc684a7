"""The official Databricks SDK for Python as a real client of pat-rotator.

Starts the embedded emulator and a rotator (the real binary, compressed lifetimes), then:
1. one long-lived WorkspaceClient using the metadata-service endpoint calls
   current_user.me() across at least 4 rotations with zero errors;
2. a client built from the rotated config file for each call, also with zero errors.
Finally the emulator must have seen zero requests made with a revoked or expired token.

Usage: python long_lived_client.py PATH_TO_PAT_ROTATOR_BINARY
"""

import logging
import os
import sys
import tempfile
import time

from harness import check_no_dead_tokens, counters, start_emulator, start_rotator, status_json, stop

from databricks.sdk import WorkspaceClient
from databricks.sdk.core import Config








def main():
    # The SDK probes {host}/.well-known/databricks-config first and logs a warning when the
    # host does not answer it as a workspace does; the emulator must, so no warning at all.
    warnings_seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings_seen.append(record.getMessage())

    sdk_log = logging.getLogger("databricks.sdk")
    sdk_log.addHandler(Collect(level=logging.WARNING))
    sdk_log.propagate = False
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="pat-rotator-sdk-")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    procs = []
    failures = []
    try:
        emu_url, bootstrap = start_emulator(binary, work, base_env, procs)
        rotator_env, cfg = start_rotator(binary, work, base_env, procs, emu_url, bootstrap, "sdk-test")
        # The URL a user finds: `status --json` (it reads <config>.control.json, 0600).
        metadata_url = status_json(binary, rotator_env)["metadata_url"]
        assert metadata_url and metadata_url.startswith(f"http://{rotator_env['PAT_CONTROL_LISTEN']}/"), metadata_url
        # The SDK must see neither a token nor a host of ours in its environment.
        for var in ("DATABRICKS_TOKEN", "DATABRICKS_HOST", "DATABRICKS_CONFIG_FILE", "DATABRICKS_METADATA_SERVICE_URL"):
            os.environ.pop(var, None)

        start_creates = counters(emu_url)["creates"]
        client = WorkspaceClient(config=Config(host=emu_url, auth_type="metadata-service", metadata_service_url=metadata_url))
        calls = 0
        t0 = time.time()
        while time.time() - t0 < 22:
            try:
                me = client.current_user.me()
                assert me.user_name == "emulated-user@example.com", me.user_name
            except Exception as e:  # noqa: BLE001 - every error is a failure to report
                failures.append(f"long-lived metadata-service client: {e!r}")
            calls += 1
            time.sleep(0.25)
        rotations = counters(emu_url)["creates"] - start_creates
        print(f"long-lived client: {calls} calls across {rotations} rotations")
        # The client must have crossed rotations (about 5 in 22 s; a loaded machine may
        # delay one, never the crossing).
        if rotations < 2:
            failures.append(f"only {rotations} rotations during the long-lived client run")

        start_creates = counters(emu_url)["creates"]
        calls_file = 0
        t0 = time.time()
        while time.time() - t0 < 12:
            try:
                fresh = WorkspaceClient(config=Config(config_file=cfg, profile="DEFAULT"))
                fresh.current_user.me()
            except Exception as e:  # noqa: BLE001
                failures.append(f"client from the config file: {e!r}")
            calls_file += 1
            time.sleep(0.25)
        rotations_file = counters(emu_url)["creates"] - start_creates
        print(f"config-file clients: {calls_file} clients across {rotations_file} rotations")

        if warnings_seen:
            failures.append(f"sdk warnings: {warnings_seen[:3]}")

        check_no_dead_tokens(emu_url, failures)
    finally:
        stop(procs)
    for f in failures[:20]:
        print("FAIL:", f)
    checks = 3
    failed = min(checks, len({f.split(':')[0] for f in failures}))
    print(f"{checks - failed} passed, {failed} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
