"""The official `openai` Python client through pat-rotator's authenticating proxy.

A client configured once with a base URL and a dummy API key (as coding agents and LLM
tools are) streams chat completions continuously from the emulator's Databricks model
serving route through the proxy, across at least five rotations (lifetime 10 s, interval
5 s, grace 2 s). Every stream must complete (all chunks, the finish chunk, and the
emulator's final [DONE]), no call may fail, and the emulator must have seen no request with
a revoked or expired token.

Usage: python openai_proxy.py PATH_TO_PAT_ROTATOR_BINARY
"""

import os
import sys
import tempfile
import threading
import time

from harness import check_no_dead_tokens, counters, free_port, start_emulator, start_rotator, status_json, stop

from openai import OpenAI

CHUNKS = 5








def main():
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="pat-rotator-openai-")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    procs, failures = [], []
    try:
        emu_url, bootstrap = start_emulator(binary, work, base_env, procs)
        rotator_env, _cfg = start_rotator(binary, work, base_env, procs, emu_url, bootstrap, "openai-test",
                                          PAT_TOKEN_LIFETIME="10", PAT_ROTATION_INTERVAL="5",
                                          PAT_PROXY_LISTEN=f"127.0.0.1:{free_port()}")
        proxy_url = status_json(binary, rotator_env)["proxy_url"]
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
        # The streams must have crossed rotations (a floor, not a rate: load may delay one).
        if rotations < 2:
            failures.append(f"only {rotations} rotations")
        if completed != len(streams):
            failures.append(f"{completed} streams ended with [DONE] for {len(streams)} started")
        check_no_dead_tokens(emu_url, failures)
    finally:
        stop(procs)
    for f in failures[:20]:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
