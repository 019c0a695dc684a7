"""The operator's kit, checked with the real tools: the alert rules and the Grafana dashboard
against a running rotator scraped by a real Prometheus, the systemd units with
systemd-analyze, and the shell completions and manual pages the binary generates.

Every check has a counterpart that must fail (a misspelt metric, a broken expression, an
unknown unit key), so a green run means the checks can see what they look for.

Usage: python check_kit.py PATH_TO_PAT_ROTATOR_BINARY (from the repository root)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdk"))
from harness import free_port, start_emulator, start_rotator, stop, wait_for  # noqa: E402

RULES = "helm/pat-rotator/files/prometheus-rules.yaml"
RULES_TEST = "tests/ops/rules_test.yaml"
DASHBOARD = "helm/pat-rotator/files/grafana-dashboard.json"
UNITS = ["deploy/systemd/pat-rotator.service", "deploy/systemd/pat-rotator@.service"]
METRIC = re.compile(r"\bpat_rotator_[a-z0-9_]+")
results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))


def require(tool):
    path = shutil.which(tool)
    if not path:
        raise SystemExit(f"error: {tool} is not on PATH (scripts/test.sh installs it: apt-get install prometheus / systemd / man-db)")
    return path


def rule_exprs(rules):
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs(board):
    out = []
    for p in board["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable {v['name']}", v["query"]["query"]))
    return out


def unknown_names(exprs, exported):
    """The pat_rotator_* names an expression uses that the service does not export."""
    return sorted({n for _, e in exprs for n in METRIC.findall(e)} - exported)


def grafana_to_promql(expr):
    # What Grafana substitutes before sending a query: the variables and $__rate_interval.
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")


def scrape_names(metrics_url):
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# The cluster store's series: registered when that store starts, absent under the file store.
CLUSTER_SERIES = {"pat_rotator_lease_holder", "pat_rotator_cluster_api_reachable",
                  "pat_rotator_cluster_last_sync_timestamp_seconds"}


def cluster_store_names(binary, work, base_env, procs, emu_url, bootstrap):
    """The names a rotator on the cluster store exports. Its API server is a closed loopback
    port: the store starts all the same (it rides out an outage on the pod's file), and its
    series are there from the start. Not ready (no token yet), so /healthz is waited for."""
    home = os.path.join(work, "cluster-store")
    os.makedirs(home, exist_ok=True)
    kubeconfig = os.path.join(home, "kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
clusters: [{{name: none, cluster: {{server: "https://127.0.0.1:{free_port()}"}}}}]
users: [{{name: none, user: {{token: none}}}}]
contexts: [{{name: none, context: {{cluster: none, user: none, namespace: kit}}}}]
current-context: none
""")
    listen = free_port()
    env = dict(base_env, HOME=home, KUBECONFIG=kubeconfig, PAT_STORE="kubernetes",
               DATABRICKS_HOST=emu_url, DATABRICKS_TOKEN=bootstrap,
               DATABRICKS_CONFIG_FILE=os.path.join(home, "databrickscfg"),
               PAT_INSTANCE="kit-cluster", PAT_HTTP_TIMEOUT="2",
               PAT_LISTEN=f"127.0.0.1:{listen}", PAT_CONTROL_LISTEN=f"127.0.0.1:{free_port()}",
               RUST_LOG="warn")
    log = open(os.path.join(home, "rotator.log"), "w")
    procs.append(subprocess.Popen([binary, "run"], env=env, stdout=subprocess.DEVNULL, stderr=log))
    wait_for(f"http://127.0.0.1:{listen}/healthz")
    return scrape_names(f"http://127.0.0.1:{listen}/metrics")


def prom_query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def alerts_and_dashboard(binary, work, procs):
    promtool, prometheus = require("promtool"), require("prometheus")
    with open(RULES) as f:
        rules = yaml.safe_load(f)
    with open(DASHBOARD) as f:
        board = json.load(f)

    # Syntax and the alerts' own unit tests.
    out = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True)
    check("promtool check rules: every expression parses", out.returncode == 0, out.stdout + out.stderr)
    out = subprocess.run([promtool, "test", "rules", RULES_TEST], capture_output=True, text=True)
    check("promtool test rules: each alert fires on its series and not on a healthy rotator", out.returncode == 0, out.stdout + out.stderr)
    broken = os.path.join(work, "broken-rules.yaml")
    with open(broken, "w") as f:
        f.write(open(RULES).read().replace("pat_rotator_ready == 0", "pat_rotator_ready == == 0"))
    out = subprocess.run([promtool, "check", "rules", broken], capture_output=True, text=True)
    check("promtool check rules refuses a broken expression (the check can fail)", out.returncode != 0)

    # A rotator (with the proxy on, so every family is there) and the names it exports.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": work}
    emu_url, bootstrap = start_emulator(binary, work, env, procs)
    rotator_env, _cfg = start_rotator(binary, work, env, procs, emu_url, bootstrap, "kit",
                                      PAT_TOKEN_LIFETIME="30", PAT_ROTATION_INTERVAL="10",
                                      PAT_PROXY_LISTEN=f"127.0.0.1:{free_port()}")
    listen = rotator_env["PAT_LISTEN"].rsplit(":", 1)[1]
    exported = scrape_names(f"http://127.0.0.1:{listen}/metrics")
    check("the rotator exports its metrics", "pat_rotator_ready" in exported and len(exported) > 20, sorted(exported))
    check("the file store exports no cluster series", not exported & CLUSTER_SERIES, sorted(exported & CLUSTER_SERIES))
    on_cluster = cluster_store_names(binary, work, env, procs, emu_url, bootstrap)
    check("the cluster store adds its series to the same families", CLUSTER_SERIES <= on_cluster and exported <= on_cluster,
          sorted((CLUSTER_SERIES | exported) - on_cluster))
    exported |= on_cluster
    check("the alert rules use only exported metrics", not unknown_names(rule_exprs(rules), exported), unknown_names(rule_exprs(rules), exported))
    check("the dashboard uses only exported metrics", not unknown_names(dashboard_exprs(board), exported), unknown_names(dashboard_exprs(board), exported))
    misspelt = [("x", "rate(pat_rotator_rotation_total[5m])")]
    check("a misspelt metric is caught (the check can fail)", unknown_names(misspelt, exported) == ["pat_rotator_rotation_total"])

    # A real Prometheus scrapes the rotator and evaluates the rules and every dashboard query.
    prom_port = free_port()
    prom_dir = os.path.join(work, "prometheus")
    os.makedirs(prom_dir)
    with open(os.path.join(prom_dir, "prometheus.yml"), "w") as f:
        yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [os.path.abspath(RULES)],
            "scrape_configs": [{"job_name": "pat-rotator", "static_configs": [{"targets": [f"127.0.0.1:{listen}"]}]}],
        }, f)
    procs.append(subprocess.Popen(
        [prometheus, f"--config.file={prom_dir}/prometheus.yml", f"--storage.tsdb.path={prom_dir}/data",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "prometheus.log"), "w")))
    base = f"http://127.0.0.1:{prom_port}"
    wait_for(f"{base}/-/ready", timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        up = prom_query(base, 'up{job="pat-rotator"}')
        if up.get("data", {}).get("result") and up["data"]["result"][0]["value"][1] == "1" and prom_query(base, "count(pat_rotator_ready)")["data"]["result"]:
            break
        time.sleep(0.5)
    check("Prometheus scrapes the rotator", prom_query(base, "pat_rotator_ready")["data"]["result"])
    failed = []
    for title, expr in dashboard_exprs(board):
        if title.startswith("variable "):
            continue  # label_values() is Grafana's, not PromQL.
        answer = prom_query(base, grafana_to_promql(expr))
        if answer.get("status") != "success":
            failed.append((title, answer.get("error")))
    check(f"every dashboard query ({len(dashboard_exprs(board))}) evaluates on Prometheus", not failed, failed)
    bad = prom_query(base, grafana_to_promql("sum by (kind) (increase(pat_rotator_failures_total[$__rate_interval]"))
    check("a broken dashboard query is refused (the check can fail)", bad.get("status") == "error")
    ready = prom_query(base, grafana_to_promql('min by (instance) (pat_rotator_ready{job=~"$job", instance=~"$instance"})'))
    check("the Ready panel shows the running rotator as ready", [r["value"][1] for r in ready["data"]["result"]] == ["1"], ready)
    # Rule evaluation on real data: every rule healthy, and none firing for a healthy rotator.
    deadline = time.time() + 20
    groups = []
    while time.time() < deadline:
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        if groups and all(rule.get("lastEvaluation", "").startswith("20") for g in groups for rule in g["rules"]):
            break
        time.sleep(0.5)
    evaluated = [rule for g in groups for rule in g["rules"]]
    check(f"Prometheus loads and evaluates every rule ({len(evaluated)})", len(evaluated) == len(rule_exprs(rules)) and all(r["health"] == "ok" for r in evaluated),
          [(r["name"], r["health"], r.get("lastError")) for r in evaluated])
    firing = [r["name"] for r in evaluated if r.get("state") == "firing"]
    check("no alert fires for a healthy rotator", not firing, firing)

    # The dashboard's own shape: what Grafana needs to import it.
    check("dashboard: uid, title, schemaVersion, a Prometheus data-source variable",
          board.get("uid") and board.get("title") and board.get("schemaVersion", 0) >= 30 and any(v["type"] == "datasource" and v["query"] == "prometheus" for v in board["templating"]["list"]))
    ids = [p["id"] for p in board["panels"]]
    check("dashboard: panel ids unique, every panel placed on the 24-column grid", len(ids) == len(set(ids)) and all(0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in board["panels"]))


def systemd_units(binary, work):
    analyze = require("systemd-analyze")
    require("man")
    # The pages Documentation=man:pat-rotator(1) names, generated by the binary itself.
    mandir = os.path.join(work, "man")
    out = subprocess.run([binary, "man", "--out-dir", os.path.join(mandir, "man1")], capture_output=True, text=True)
    check("pat-rotator man --out-dir writes the pages", out.returncode == 0 and os.path.exists(os.path.join(mandir, "man1", "pat-rotator.1")), out.stderr)
    env = dict(os.environ, MANPATH=mandir, SYSTEMD_LOG_COLOR="0")
    page = subprocess.run(["man", "pat-rotator"], env=dict(env, MANWIDTH="100", MANPAGER="cat", PAGER="cat"), capture_output=True, text=True)
    # The README's configuration table (itself checked against the code's table, both ways,
    # by a unit test): every variable a user can read about must be in the manual page.
    with open("README.md") as f:
        section = f.read().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    variables = re.findall(r"^\| `([A-Z_]+)` \|", section, re.M)
    check("the manual page has ENVIRONMENT with every variable and EXIT STATUS",
          variables and all(v in page.stdout for v in variables) and "ENVIRONMENT" in page.stdout and "EXIT STATUS" in page.stdout, page.stderr[:300])
    run_page = subprocess.run(["man", "pat-rotator-run"], env=dict(env, MANPAGER="cat", PAGER="cat"), capture_output=True, text=True)
    check("pat-rotator-run(1) has the environment too", "PAT_ROTATION_INTERVAL" in run_page.stdout)

    unit_dir = os.path.join(work, "units")
    os.makedirs(unit_dir)
    for source in UNITS:
        text = open(source).read()
        check(f"{os.path.basename(source)}: hardened, restarts on failure, generous LimitNOFILE",
              all(f"\n{d}\n" in text for d in ["NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=strict", "ProtectHome=yes", "Restart=on-failure", "RestartPreventExitStatus=78", "TimeoutStopSec=30"])
              and int(re.search(r"\nLimitNOFILE=(\d+)\n", text).group(1)) >= 65536)
        # verify checks that ExecStart exists: point it at the binary under test.
        with open(os.path.join(unit_dir, os.path.basename(source)), "w") as f:
            f.write(text.replace("/usr/local/bin/pat-rotator", os.path.abspath(binary)))
    shutil.copy(os.path.join(unit_dir, "pat-rotator@.service"), os.path.join(unit_dir, "pat-rotator@staging.service"))
    for unit in ["pat-rotator.service", "pat-rotator@staging.service"]:
        out = subprocess.run([analyze, "verify", os.path.join(unit_dir, unit)], env=env, capture_output=True, text=True)
        # verify only warns (exit 0) on an unknown key or a bad value: any output is a failure.
        check(f"systemd-analyze verify {unit}: no complaint", out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr)
        out = subprocess.run([analyze, "security", "--offline=true", os.path.join(unit_dir, unit)], env=env, capture_output=True, text=True)
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
        check(f"systemd-analyze security {unit}: exposure at most 2.0 (of 10)", level and float(level.group(1)) <= 2.0, out.stdout[-300:])
    bad = os.path.join(unit_dir, "bad.service")
    with open(bad, "w") as f:
        f.write(open(os.path.join(unit_dir, "pat-rotator.service")).read().replace("PrivateTmp=yes", "PrivateTmp=yes\nProtectSystem=sideways\nBogusKey=1"))
    out = subprocess.run([analyze, "verify", bad], env=env, capture_output=True, text=True)
    check("systemd-analyze verify complains about a broken unit (the check can fail)", (out.stdout + out.stderr).strip())


def completions(binary):
    out = subprocess.run([binary, "completions", "bash"], capture_output=True, text=True)
    check("completions bash: generated", out.returncode == 0 and out.stdout)
    script = out.stdout + "\ncomplete -p pat-rotator\n"
    sourced = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    check("completions bash: the script loads and registers pat-rotator", sourced.returncode == 0 and "pat-rotator" in sourced.stdout, sourced.stderr)
    # Ask bash's completion function what follows `pat-rotator st`, as a shell would.
    ask = out.stdout + '\nCOMP_WORDS=(pat-rotator st); COMP_CWORD=1; COMP_LINE="pat-rotator st"; COMP_POINT=${#COMP_LINE}\n_pat__rotator pat-rotator st pat-rotator\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    answer = subprocess.run(["bash", "-c", ask], capture_output=True, text=True)
    check("completions bash: `pat-rotator st<TAB>` completes to status", answer.stdout.split() == ["status"], answer.stdout + answer.stderr)
    for shell in ["zsh", "fish", "elvish", "powershell"]:
        out = subprocess.run([binary, "completions", shell], capture_output=True, text=True)
        check(f"completions {shell}: generated", out.returncode == 0 and "status" in out.stdout)
    out = subprocess.run([binary, "completions", "tcsh"], capture_output=True, text=True)
    check("completions for an unknown shell: usage error (exit 2)", out.returncode == 2)


def main():
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="pat-rotator-kit-")
    procs = []
    try:
        alerts_and_dashboard(binary, work, procs)
    finally:
        stop(procs)
    systemd_units(binary, work)
    completions(binary)
    failed = [n for n, ok in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} operator-kit checks passed")
    if failed:
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
