"""The official Databricks SDK for JavaScript as a real client of pat-rotator.

Starts the embedded emulator and a rotator (the real binary, compressed lifetimes), then runs
js_client.js under Node 22: a long-lived metadata-service client and a per-call client from
the config file, across rotations, with 0 errors allowed; the emulator must have seen no
request with a revoked or expired token.

Usage: python js_client.py PATH_TO_PAT_ROTATOR_BINARY NODE_BINARY NODE_MODULES_PARENT
"""

import json
import os
import subprocess
import sys
import tempfile

from harness import check_no_dead_tokens, counters, start_emulator, start_rotator, status_json, stop

LONG_S, FILE_S = 22, 12


def main():
    binary, node, modules = (os.path.abspath(a) for a in sys.argv[1:4])
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js_client.js")
    work = tempfile.mkdtemp(prefix="pat-rotator-js-")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    procs, failures = [], []
    try:
        emu_url, bootstrap = start_emulator(binary, work, base_env, procs)
        rotator_env, cfg = start_rotator(binary, work, base_env, procs, emu_url, bootstrap, "js-sdk-test")
        metadata_url = status_json(binary, rotator_env)["metadata_url"]
        start_creates = counters(emu_url)["creates"]
        # The SDK sees neither a token nor our host in its environment: only what it is given.
        js_env = {"PATH": os.environ.get("PATH", ""), "HOME": work, "NODE_PATH": os.path.join(modules, "node_modules"),
                  "PAT_JS_HOST": emu_url, "PAT_JS_METADATA_URL": metadata_url, "PAT_JS_CONFIG_FILE": cfg,
                  "PAT_JS_LONG_S": str(LONG_S), "PAT_JS_FILE_S": str(FILE_S)}
        run = subprocess.run([node, script],
                             env=js_env, capture_output=True, text=True, timeout=LONG_S + FILE_S + 60)
        rotations = counters(emu_url)["creates"] - start_creates
        try:
            result = json.loads(run.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {"fatal": f"no result (exit {run.returncode}): {run.stdout[-300:]} {run.stderr[-500:]}"}
        if "fatal" in result:
            failures.append(f"the JavaScript SDK run failed: {result['fatal']}")
        else:
            for name in ("metadata", "file"):
                phase = result[name]
                print(f"{name} client ({result['node']}): {phase['calls']} calls, {len(phase['errors'])} errors")
                if phase["calls"] < 10:
                    failures.append(f"{name} client made only {phase['calls']} calls")
                failures += [f"{name} client: {e}" for e in phase["errors"]]
        print(f"rotations during the run: {rotations}")
        # The run spans several token lifetimes (8 s): the clients must have crossed rotations.
        if rotations < 2:
            failures.append(f"only {rotations} rotations during the run: the clients crossed none")
        check_no_dead_tokens(emu_url, failures)

        # The check can fail: the same client without the capability in its URL gets no token.
        control = rotator_env["PAT_CONTROL_LISTEN"]
        bad = dict(js_env, PAT_JS_METADATA_URL=f"http://{control}/v1/databricks/token", PAT_JS_LONG_S="1", PAT_JS_FILE_S="0")
        run = subprocess.run([node, script],
                             env=bad, capture_output=True, text=True, timeout=60)
        out = run.stdout.strip().splitlines()
        refused = out and ("fatal" in json.loads(out[-1]) or json.loads(out[-1])["metadata"]["errors"])
        print(f"without the capability: {'refused' if refused else 'NOT refused'}")
        if not refused:
            failures.append("a client without the capability got a token: the error count cannot be trusted")
    finally:
        stop(procs)
    for f in failures[:20]:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
