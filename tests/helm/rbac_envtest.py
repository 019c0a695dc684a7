"""The chart's Role is enough, and a missing verb is reported: on a real API server
(../shared/envtest), a `pat-rotator run` replica authenticates as the envtest `limited` user
bound to the Role rendered from the chart (store: kubernetes). It must rotate the Secret and be
ready; with one verb taken out of the Role it must name that verb and resource on /readyz and
be not ready; with the verb granted again it must recover without a restart.

Usage: python rbac_envtest.py BINARY CHART
"""

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "sdk"))
from check_chart import REQUIRED, merge, render  # noqa: E402
from harness import free_port, start_emulator, stop  # noqa: E402

ENVTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "envtest")
SECRET = "databricks-pat"
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))


def kubectl(kubeconfig, *args, stdin=None):
    return subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": kubeconfig}, check=False)


def readyz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def wait_for(what, limit):
    end = time.time() + limit
    while time.time() < end:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    return None


def main():
    binary, chart = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    if not os.path.exists(os.path.join(ENVTEST, "start.sh")):
        print(f"SKIPPED: the RBAC check needs the shared envtest at {ENVTEST}")
        return 1 if os.environ.get("PAT_REQUIRE_ENVTEST") else 0
    values = merge(REQUIRED, {"store": "kubernetes", "databricks": {"bootstrapSecret": {"name": SECRET}}})
    docs = render(chart, values)
    role = next(d for _, d in docs if d["kind"] == "Role")
    role["metadata"]["namespace"] = "default"
    work = tempfile.mkdtemp()
    started = subprocess.run(["bash", os.path.join(ENVTEST, "start.sh"), os.path.join(work, "k8s")],
                             capture_output=True, text=True, check=False)
    if started.returncode != 0:
        check("envtest starts", False, started.stderr[-400:])
        return 1
    admin = re.search(r"KUBECONFIG=(\S+)", started.stdout).group(1)
    procs = []
    try:
        limited = os.path.join(work, "limited.kubeconfig")
        with open(admin) as f, open(limited, "w") as g:
            g.write(f.read().replace("current-context: admin", "current-context: limited"))
        host, seed = start_emulator(binary, work, {"PATH": os.environ.get("PATH", "")}, procs)
        # From the emulator's 0600 token file: a token never goes on a command line (`ps`).
        kubectl(admin, "create", "secret", "generic", SECRET, f"--from-file=token={os.path.join(work, 'bootstrap')}")
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "pat-rotator-limited", "namespace": "default"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]},
                   "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "limited"}]}
        applied = kubectl(admin, "apply", "-f", "-", stdin=yaml.safe_dump_all([role, binding]))
        check("the chart's Role and a binding to `limited` apply", applied.returncode == 0, applied.stderr)
        denied = kubectl(limited, "get", "secrets")
        check("`limited` may not list every Secret", denied.returncode != 0 and "forbidden" in denied.stderr.lower())

        listen = free_port()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": work, "KUBECONFIG": limited,
               "DATABRICKS_HOST": host, "DATABRICKS_CONFIG_FILE": os.path.join(work, "databrickscfg"),
               "PAT_STORE": "kubernetes", "PAT_KUBE_SECRET": SECRET, "PAT_INSTANCE": "pod-rbac",
               "PAT_TOKEN_LIFETIME": "30", "PAT_ROTATION_INTERVAL": "15", "PAT_REVOKE_GRACE": "2",
               "PAT_HTTP_TIMEOUT": "3", "PAT_WRITE_LOCK_WAIT": "4",
               "PAT_LISTEN": f"127.0.0.1:{listen}", "PAT_CONTROL_LISTEN": f"127.0.0.1:{free_port()}"}
        run_log = os.path.join(work, "run.log")
        procs.append(subprocess.Popen([binary, "run"], env=env, stdout=subprocess.DEVNULL, stderr=open(run_log, "w")))

        def secret_token():
            out = kubectl(admin, "get", "secret", SECRET, "-o", "go-template={{index .data \"token\" | base64decode}}")
            return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None

        ready = wait_for(lambda: readyz(listen)[0] == 200, 30)
        rotated = wait_for(lambda: (secret_token() or seed) != seed, 10)
        check("with the chart's Role: ready, and the Secret rotated", ready and rotated, open(run_log).read()[-1500:])

        # Without `watch` on Leases (DESIGN's own list lacks it) a replica reads the Lease
        # every renewal period instead: it says so, and still works. Checked on a second
        # replica started under that Role (a watch already open outlives a changed Role).
        no_watch = copy.deepcopy(role)
        for rule in no_watch["rules"]:
            if rule["resources"] == ["leases"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != "watch"]
        kubectl(admin, "apply", "-f", "-", stdin=yaml.safe_dump(no_watch))
        listen2 = free_port()
        env2 = dict(env, PAT_INSTANCE="pod-rbac-2", PAT_LISTEN=f"127.0.0.1:{listen2}",
                    PAT_CONTROL_LISTEN=f"127.0.0.1:{free_port()}",
                    DATABRICKS_CONFIG_FILE=os.path.join(work, "databrickscfg-2"))
        run_log2 = os.path.join(work, "run-2.log")
        second = subprocess.Popen([binary, "run"], env=env2, stdout=subprocess.DEVNULL, stderr=open(run_log2, "w"))
        procs.append(second)
        said = wait_for(lambda: "cannot watch the rotation Lease" in open(run_log2).read(), 20)
        ready2 = wait_for(lambda: readyz(listen2)[0] == 200, 20)
        check("without `watch` on leases: the replica says it reads the Lease instead, and is ready",
              said and ready2, open(run_log2).read()[-1500:])
        stop([second])
        procs.remove(second)
        kubectl(admin, "apply", "-f", "-", stdin=yaml.safe_dump(role))

        # Take `update` on Leases away: the holder can no longer renew.
        reduced = copy.deepcopy(role)
        for rule in reduced["rules"]:
            if rule["resources"] == ["leases"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != "update"]
        kubectl(admin, "apply", "-f", "-", stdin=yaml.safe_dump(reduced))
        reported = wait_for(lambda: (lambda s: s[0] == 503 and "update" in s[1] and "leases" in s[1] and "namespace default" in s[1])(readyz(listen)), 20)
        check("without `update` on leases: not ready, and /readyz names the verb, resource and namespace", reported, readyz(listen))

        kubectl(admin, "apply", "-f", "-", stdin=yaml.safe_dump(role))
        recovered = wait_for(lambda: readyz(listen)[0] == 200, 30)
        check("the verb granted again: ready without a restart", recovered, readyz(listen))
        check("the replica kept running throughout", procs[-1].poll() is None)
    finally:
        stop(procs)
        subprocess.run(["bash", os.path.join(ENVTEST, "stop.sh"), os.path.join(work, "k8s")], check=False)
    failed = results.count(False)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
