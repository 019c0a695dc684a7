"""The official Databricks SDK for Python and pat-rotator's OAuth.

1. Fidelity: the SDK's own `oauth-m2m` auth, and its own OAuth token client
   (`databricks.sdk.oauth.retrieve_token`) for the authorization code and refresh grants,
   work unchanged against the emulator; a replayed refresh token is refused and, under the
   strictest policy, ends the whole login.
2. U2M under single-use refresh tokens with replay revoking the login: `pat-rotator login`,
   two rotators on one config file, 20 SDK clients (10 long-lived on the metadata endpoints,
   10 built from the file per call) across at least 50 refreshes: 0 errors, 0 replays, 0
   family revocations, 0 requests with a dead token.
3. M2M through the metadata endpoint across access-token refreshes: 0 errors.

Usage: python oauth_clients.py PATH_TO_PAT_ROTATOR_BINARY
"""

import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from harness import counters, free_port, start_rotator, status_json, stop, wait_for

from databricks.sdk import WorkspaceClient
from databricks.sdk.core import Config
from databricks.sdk.oauth import retrieve_token

USER = "emulated-user@example.com"


def start_emulator(binary, work, env, procs, access_ttl):
    """`pat-rotator emulate` with OAuth: its URL, the M2M client id and secret."""
    port = free_port()
    secret_file = os.path.join(work, "client-secret")
    log = open(os.path.join(work, "emulator.log"), "w")
    procs.append(subprocess.Popen(
        [binary, "emulate", "--listen", f"127.0.0.1:{port}", "--token-file", os.path.join(work, "bootstrap"),
         "--oauth-client-secret-file", secret_file, "--access-ttl", str(access_ttl)],
        env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 10
    while time.time() < deadline:
        text = open(os.path.join(work, "emulator.log")).read()
        m = re.search(r"oauth-m2m client id: (\S+)", text)
        if m and os.path.exists(secret_file):
            return f"http://127.0.0.1:{port}", m.group(1), open(secret_file).read().strip()
        time.sleep(0.1)
    raise SystemExit("the emulator did not start")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def code_from_authorize(emu_url, redirect, verifier_challenge, state):
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": "databricks-cli", "redirect_uri": redirect,
        "scope": "all-apis offline_access", "state": state,
        "code_challenge": verifier_challenge, "code_challenge_method": "S256"})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(f"{emu_url}/oidc/v1/authorize?{query}")
    except urllib.error.HTTPError as e:
        location = e.headers["Location"]
    params = urllib.parse.parse_qs(urllib.parse.urlparse(location).query)
    assert params["state"] == [state], params
    return params["code"][0]


def fidelity(emu_url, client_id, secret, failures):
    # The SDK's own M2M auth, across several 4 s access tokens.
    before = counters(emu_url)["oauth"]["client_credentials_grants"]
    client = WorkspaceClient(config=Config(host=emu_url, client_id=client_id, client_secret=secret, auth_type="oauth-m2m"))
    t0 = time.time()
    while time.time() - t0 < 10:
        try:
            assert client.current_user.me().user_name == USER
        except Exception as e:  # noqa: BLE001
            failures.append(f"fidelity: the SDK's oauth-m2m: {e!r}")
        time.sleep(0.5)
    grants = counters(emu_url)["oauth"]["client_credentials_grants"] - before
    print(f"fidelity: the SDK's oauth-m2m took {grants} access tokens")
    if grants < 2:
        failures.append(f"fidelity: the SDK's oauth-m2m refreshed {grants} times in 10 s of 4 s tokens")

    # The SDK's own token client: code with PKCE, two refreshes, then a replay.
    import base64
    import hashlib
    verifier = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect = f"http://localhost:{free_port()}"
    code = code_from_authorize(emu_url, redirect, challenge, "s1")
    token_url = f"{emu_url}/oidc/v1/token"
    first = retrieve_token("databricks-cli", None, token_url, {
        "grant_type": "authorization_code", "code": code, "code_verifier": verifier, "redirect_uri": redirect}, use_params=True)
    second = retrieve_token("databricks-cli", None, token_url, {
        "grant_type": "refresh_token", "refresh_token": first.refresh_token}, use_params=True)
    assert second.refresh_token and second.refresh_token != first.refresh_token
    me = WorkspaceClient(config=Config(host=emu_url, token=second.access_token, auth_type="pat")).current_user.me()
    assert me.user_name == USER
    try:
        retrieve_token("databricks-cli", None, token_url, {
            "grant_type": "refresh_token", "refresh_token": first.refresh_token}, use_params=True)
        failures.append("fidelity: a replayed refresh token was accepted")
    except Exception as e:  # noqa: BLE001
        if "invalid_grant" not in str(e) and "already been used" not in str(e):
            failures.append(f"fidelity: a replay failed with something else than invalid_grant: {e!r}")
    oauth = counters(emu_url)["oauth"]
    if oauth["replays"] != 1 or oauth["family_revocations"] != 1:
        failures.append(f"fidelity: a replay should end the login: {oauth}")
    try:
        WorkspaceClient(config=Config(host=emu_url, token=second.access_token, auth_type="pat")).current_user.me()
        failures.append("fidelity: an access token of a revoked login still works")
    except Exception:  # noqa: BLE001
        pass
    print("fidelity: the SDK's code and refresh grants, and a replay that ends the login")


def log_in(binary, env):
    """`pat-rotator login`, with urllib as the browser."""
    proc = subprocess.Popen([binary, "login", "--wait", "30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stdout:
        if line.startswith("http"):
            url = line.strip()
            break
    assert url, "login printed no URL"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def readers(clients, failures, stop_at, counts):
    def long_lived(metadata_url, host, i):
        client = WorkspaceClient(config=Config(host=host, auth_type="metadata-service", metadata_service_url=metadata_url))
        while not stop_at.is_set():
            try:
                assert client.current_user.me().user_name == USER
                counts[i] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"metadata-service client: {e!r}")
            time.sleep(0.3)

    def per_call(cfg, i):
        while not stop_at.is_set():
            try:
                WorkspaceClient(config=Config(config_file=cfg, profile="DEFAULT")).current_user.me()
                counts[i] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(f"client from the config file: {e!r}")
            time.sleep(0.3)

    threads = []
    for i, (kind, arg, host) in enumerate(clients):
        target = (lambda a=arg, h=host, i=i: long_lived(a, h, i)) if kind == "metadata" else (lambda a=arg, i=i: per_call(a, i))
        t = threading.Thread(target=target, daemon=True)
        t.start()
        threads.append(t)
    return threads


def u2m(binary, work, base_env, procs, emu_url, failures):
    env_a, cfg = start_rotator(binary, work, base_env, procs, emu_url, "", "u2m-a",
                               PAT_CREDENTIAL="oauth-u2m", PAT_ROTATION_INTERVAL="2",
                               PAT_LOGIN_PORT=str(free_port()), DATABRICKS_TOKEN="",
                               wait=False)
    log_in(binary, env_a)
    wait_for(f"http://{env_a['PAT_LISTEN']}/readyz")
    env_b, _ = start_rotator(binary, work, base_env, procs, emu_url, "", "u2m-b",
                             PAT_CREDENTIAL="oauth-u2m", PAT_ROTATION_INTERVAL="2", DATABRICKS_TOKEN="",
                             log="rotator-b.log")
    urls = [status_json(binary, env_a)["metadata_url"]]
    # The second rotator publishes its URL in the same control file only while the first
    # does not: ask it directly.
    urls.append(urls[0].replace(env_a["PAT_CONTROL_LISTEN"], env_b["PAT_CONTROL_LISTEN"]))
    clients = [("metadata", urls[i % 2], emu_url) for i in range(10)] + [("file", cfg, None)] * 10
    base = counters(emu_url)["oauth"]
    start = base["refreshes"]
    stop_at = threading.Event()
    counts = [0] * len(clients)
    threads = readers(clients, failures, stop_at, counts)
    t0 = time.time()
    while counters(emu_url)["oauth"]["refreshes"] - start < 50 and time.time() - t0 < 240:
        time.sleep(1)
    stop_at.set()
    for t in threads:
        t.join(timeout=30)
    oauth = counters(emu_url)["oauth"]
    refreshes = oauth["refreshes"] - start
    print(f"u2m: 2 rotators, {len(clients)} SDK clients, {sum(counts)} calls across {refreshes} refreshes in {time.time() - t0:.0f} s; "
          f"replays {oauth['replays'] - base['replays']}, family revocations {oauth['family_revocations'] - base['family_revocations']}")
    if refreshes < 50:
        failures.append(f"u2m: only {refreshes} refreshes")
    if oauth["replays"] != base["replays"] or oauth["family_revocations"] != base["family_revocations"]:
        failures.append(f"u2m: a refresh token was replayed: {oauth} (before: {base})")
    if min(counts) == 0:
        failures.append(f"u2m: a client never succeeded: {counts}")


def m2m(binary, work, base_env, procs, emu_url, client_id, secret, failures):
    env, cfg_file = start_rotator(binary, work, base_env, procs, emu_url, "", "m2m",
                           PAT_CREDENTIAL="oauth-m2m", PAT_ROTATION_INTERVAL="2", DATABRICKS_TOKEN="",
                           DATABRICKS_CLIENT_ID=client_id, DATABRICKS_CLIENT_SECRET=secret, log="rotator-m2m.log")
    url = status_json(binary, env)["metadata_url"]
    # The profile the rotator writes resolves to one auth method in the SDK's own config
    # resolution (a profile with both token and client_id is refused by it).
    resolved = Config(config_file=cfg_file, profile="DEFAULT")
    if resolved.auth_type != "pat":
        failures.append(f"m2m: the profile resolves to {resolved.auth_type!r}, not a bearer token alone")
    with open(cfg_file) as f:
        profile_text = f.read()
    if "client_id" in profile_text or secret in profile_text:
        failures.append("m2m: the profile holds client credentials")
    client = WorkspaceClient(config=Config(host=emu_url, auth_type="metadata-service", metadata_service_url=url))
    before = counters(emu_url)["oauth"]["client_credentials_grants"]
    calls = 0
    t0 = time.time()
    while time.time() - t0 < 12:
        try:
            assert client.current_user.me().user_name == USER
        except Exception as e:  # noqa: BLE001
            failures.append(f"m2m metadata-service client: {e!r}")
        calls += 1
        time.sleep(0.25)
    grants = counters(emu_url)["oauth"]["client_credentials_grants"] - before
    print(f"m2m: a long-lived metadata-service client, {calls} calls across {grants} access tokens")
    if grants < 2:
        failures.append(f"m2m: only {grants} access tokens")


def main():
    logging.getLogger("databricks.sdk").setLevel(logging.ERROR)
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="pat-rotator-oauth-")
    base_env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    for var in ("DATABRICKS_TOKEN", "DATABRICKS_HOST", "DATABRICKS_CONFIG_FILE", "DATABRICKS_METADATA_SERVICE_URL",
                "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET"):
        os.environ.pop(var, None)
    procs = []
    failures = []
    try:
        emu_url, client_id, secret = start_emulator(binary, work, base_env, procs, access_ttl=4)
        fidelity(emu_url, client_id, secret, failures)
        # The fidelity check used a revoked login's token on purpose; readers start from here.
        dead_before = counters(emu_url)["dead_token_requests"]
        u2m(binary, os.path.join(work, "u2m"), base_env, procs, emu_url, failures)
        m2m(binary, os.path.join(work, "m2m"), base_env, procs, emu_url, client_id, secret, failures)
        dead = counters(emu_url)["dead_token_requests"] - dead_before
        print(f"emulator: {dead} requests with a dead token")
        if dead:
            failures.append(f"{dead} requests were made with a revoked or expired token")
    finally:
        stop(procs)
    for f in failures[:20]:
        print("FAIL:", f)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
