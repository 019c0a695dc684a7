"""Checks of the Helm chart with the real Helm library (Helm 4, through helm-python-sdk and
helm-sdkpy), rendered manifests validated by kubernetes-validate --strict, and proof that the
checks can fail: a wrong type, an unknown key and a broken template must all be rejected.

Usage: python check_chart.py helm/pat-rotator
"""

import asyncio
import copy
import json
import base64
import os
import shutil
import sys
import tempfile

import helm_python
import helm_sdkpy
import kubernetes_validate
import yaml

KUBE_VERSION = "1.30.0"
results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))


def merge(base, override):
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


REQUIRED = {"databricks": {"host": "https://adb-1234567890123456.7.azuredatabricks.net", "bootstrapSecret": {"name": "databricks-bootstrap"}}}
VALUE_SETS = {
    "native sidecar (default)": REQUIRED,
    "classic container": merge(REQUIRED, {"sidecarMode": "container"}),
    "servicemonitor, hook and custom ports": merge(REQUIRED, {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "rotation": {"onRotate": "kill -HUP 1", "tokenLifetime": 3600, "rotationInterval": 1800},
        "ports": {"metrics": 19464, "control": 19465},
        "workload": {"env": [{"name": "EXTRA", "value": "1"}]},
    }),
    "an existing control secret": merge(REQUIRED, {"controlSecret": {"existingSecret": "my-control"}}),
    "compressed soak settings": merge(REQUIRED, {"rotation": {"tokenLifetime": 8, "rotationInterval": 4, "revokeGrace": 2}}),
    "cluster store, 3 replicas": merge(REQUIRED, {"store": "kubernetes", "workload": {"replicas": 3}, "cluster": {"revokeSeed": True}}),
    "oauth-m2m, no bootstrap token": {"databricks": {"host": "https://adb-1234567890123456.7.azuredatabricks.net", "credential": "oauth-m2m",
                                                     "oauth": {"clientId": "sp-app-id", "clientSecret": {"name": "sp-secret", "key": "client-secret"}}}},
    "alert rules and dashboard": merge(REQUIRED, {"metrics": {
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Databricks"}},
    }}),
}

# DESIGN's "Needs only", plus `watch` on Leases (issue 35: replicas watch the Lease instead
# of reading it every renewal period; without it they fall back to reading): exactly these
# verbs, the Secret by name.
CLUSTER_RULES = [
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "update"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "watch"]},
]


def cluster_rbac(docs):
    """The ServiceAccount, Role and RoleBinding a cluster-store render made."""
    by_kind = {d["kind"]: d for _, d in docs}
    return by_kind.get("ServiceAccount"), by_kind.get("Role"), by_kind.get("RoleBinding")


def helm_lint_errors(chart, values):
    report = helm_python.lint(chart, values, strict=True, kube_version="v" + KUBE_VERSION)
    errors = [m for m in report.get("messages", []) if m.get("severity") == 3] + list(report.get("errors") or [])
    return errors


def sdkpy_lint_ok(chart_dir, values):
    """helm-sdkpy's Lint takes only a path: lint a copy whose values.yaml carries `values`."""
    work = tempfile.mkdtemp()
    copy_dir = os.path.join(work, "pat-rotator")
    shutil.copytree(chart_dir, copy_dir)
    with open(os.path.join(copy_dir, "values.yaml")) as f:
        base = yaml.safe_load(f)
    with open(os.path.join(copy_dir, "values.yaml"), "w") as f:
        yaml.safe_dump(merge(base, values), f)

    async def run():
        lint = helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace="default"))
        return await lint.run(copy_dir)

    try:
        result = asyncio.run(run())
    except Exception as e:  # noqa: BLE001 - a failed lint raises
        return False, repr(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # helm-sdkpy passes Helm's Go structs through: capitalised keys, error texts empty.
    messages = result.get("Messages") or result.get("messages") or []
    errors = result.get("Errors") or result.get("errors") or []
    failed = bool(errors) or any((m.get("Severity") or m.get("severity")) == 3 for m in messages if isinstance(m, dict))
    return not failed, json.dumps(result)[:300]


def render(chart_dir, values):
    chart = helm_python.Chart.load(chart_dir)
    try:
        rendered = chart.render(values, name="demo", namespace="default", is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def operator_kit(chart, name, values, docs):
    """The PrometheusRule and the dashboard ConfigMap: present exactly when enabled, and
    carrying the chart's files unchanged (one source for plain Prometheus and the chart)."""
    metrics = values.get("metrics", {})
    rules = [d for _, d in docs if d["kind"] == "PrometheusRule"]
    boards = [d for _, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    want_rules = metrics.get("prometheusRule", {}).get("enabled", False)
    want_board = metrics.get("grafanaDashboard", {}).get("enabled", False)
    check(f"PrometheusRule rendered only when enabled: {name}", len(rules) == int(want_rules))
    check(f"dashboard ConfigMap rendered only when enabled: {name}", len(boards) == int(want_board))
    if rules:
        with open(os.path.join(chart, "files", "prometheus-rules.yaml")) as f:
            source = yaml.safe_load(f)
        rule = rules[0]
        check(f"PrometheusRule carries files/prometheus-rules.yaml unchanged: {name}", rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["spec"]["groups"] == source["groups"])
        check(f"PrometheusRule labels for the ruleSelector: {name}", rule["metadata"]["labels"].get("release") == "prom")
    if boards:
        with open(os.path.join(chart, "files", "grafana-dashboard.json")) as f:
            source = json.load(f)
        board = boards[0]
        check(f"dashboard ConfigMap carries files/grafana-dashboard.json unchanged: {name}", json.loads(board["data"]["pat-rotator.json"]) == source)
        check(f"dashboard ConfigMap has the Grafana sidecar's label and folder annotation: {name}", board["metadata"]["labels"].get("grafana_dashboard") == "1" and board["metadata"].get("annotations", {}).get("grafana_folder") == "Databricks")


def containers_of(deployment):
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []), spec["containers"], spec["volumes"]


def main():
    chart = os.path.abspath(sys.argv[1])
    with open(os.path.join(chart, "values.yaml")) as f:
        defaults = yaml.safe_load(f)

    for name, values in VALUE_SETS.items():
        errors = helm_lint_errors(chart, values)
        check(f"helm lint --strict: {name}", not errors, errors)
        ok, detail = sdkpy_lint_ok(chart, values)
        check(f"helm-sdkpy Lint: {name}", ok, detail)
        try:
            docs = render(chart, values)
        except Exception as e:  # noqa: BLE001
            check(f"render: {name}", False, repr(e))
            continue
        check(f"render: {name}", docs)
        operator_kit(chart, name, values, docs)
        for path, doc in docs:
            if doc["kind"] == "PrometheusRule":
                continue  # A CRD: operator_kit checks it against the rule file.
            if doc["kind"] == "ServiceMonitor":
                # A CRD: not in kubernetes-validate's bundled schemas; check its shape instead.
                check(f"ServiceMonitor shape: {name}", doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]["endpoints"][0]["port"] == "metrics")
                continue
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                check(f"kubernetes-validate --strict {doc['kind']}: {name}", True)
            except Exception as e:  # noqa: BLE001
                check(f"kubernetes-validate --strict {doc['kind']}: {name}", False, str(e)[:400])
        deployment = next(d for _, d in docs if d["kind"] == "Deployment")
        init, main_containers, volumes = containers_of(deployment)
        merged = merge(defaults, values)
        native = merged["sidecarMode"] == "native"
        sidecar = next((c for c in (init if native else main_containers) if c["name"] == "pat-rotator"), None)
        check(f"sidecar placed for {merged['sidecarMode']} mode: {name}", sidecar is not None and (sidecar.get("restartPolicy") == "Always") == native)
        if sidecar is None:
            continue
        env = {e["name"]: e for e in sidecar["env"]}
        if merged["store"] == "kubernetes":
            sa, role, binding = cluster_rbac(docs)
            bootstrap = merged["databricks"]["bootstrapSecret"]["name"]
            rules = role["rules"] if role else []
            check(f"cluster store: the Role has exactly DESIGN's verbs and watch on Leases: {name}", [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in rules] == CLUSTER_RULES, rules)
            check(f"cluster store: the Secret rule names only the store Secret: {name}", rules and rules[0].get("resourceNames") == [bootstrap])
            pod = deployment["spec"]["template"]["spec"]
            check(f"cluster store: the pod runs as the bound ServiceAccount: {name}", sa and binding and pod.get("serviceAccountName") == sa["metadata"]["name"] == binding["subjects"][0]["name"] and binding["roleRef"]["name"] == role["metadata"]["name"])
            check(f"cluster store: variables set, no long-lived token in the environment: {name}", env["PAT_STORE"]["value"] == "kubernetes" and env["PAT_KUBE_SECRET"]["value"] == bootstrap and env["PAT_KUBE_LEASE"]["value"] == bootstrap + "-rotation" and "DATABRICKS_TOKEN" not in env and env["PAT_REVOKE_SEED"]["value"] == "true")
            check(f"cluster store: PAT_INSTANCE stays the pod name: {name}", env["PAT_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name")
            check(f"cluster store: replicas as asked: {name}", deployment["spec"]["replicas"] == merged["workload"]["replicas"])
        elif merged["databricks"]["credential"] == "oauth-m2m":
            secret = env.get("DATABRICKS_CLIENT_SECRET", {})
            check(f"oauth-m2m: the client secret from a Secret, no bootstrap token: {name}",
                  env["PAT_CREDENTIAL"]["value"] == "oauth-m2m" and env["DATABRICKS_CLIENT_ID"]["value"] == "sp-app-id"
                  and secret.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "sp-secret" and "value" not in secret
                  and "DATABRICKS_TOKEN" not in env)
        else:
            check(f"bootstrap token from a Secret: {name}", "secretKeyRef" in env["DATABRICKS_TOKEN"].get("valueFrom", {}) and "value" not in env["DATABRICKS_TOKEN"])
            check(f"file store: no ServiceAccount, Role or RoleBinding: {name}", cluster_rbac(docs) == (None, None, None))
        all_mounts = [m for c in init + main_containers for m in c.get("volumeMounts", [])]
        check(f"config dir mounted as a directory, never subPath: {name}", all_mounts and not any("subPath" in m for m in all_mounts))
        check(f"config dir is an emptyDir: {name}", any(v["name"] == "databricks-config" and "emptyDir" in v for v in volumes))
        sc = sidecar["securityContext"]
        check(f"hardened securityContext: {name}", sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault" and not sc["allowPrivilegeEscalation"])
        check(f"probes on /healthz and /readyz: {name}", sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz" and sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz" and sidecar["startupProbe"]["httpGet"]["path"] == "/readyz")
        workload = next(c for c in main_containers if c["name"] == "workload")
        wenv = {e["name"]: e.get("value") for e in workload["env"]}
        secret_name = env["PAT_CONTROL_SECRET"]["valueFrom"]["secretKeyRef"]["name"]
        wref = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in workload["env"]}
        names = [e["name"] for e in workload["env"]]
        check(f"sidecar and workload share the control secret: {name}", wref.get("PAT_CONTROL_SECRET") == secret_name and names.index("PAT_CONTROL_SECRET") < names.index("DATABRICKS_METADATA_SERVICE_URL"))
        if not merged["controlSecret"]["existingSecret"]:
            made = [d for _, d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name]
            value = base64.b64decode(made[0]["data"]["control-secret"]).decode() if made else ""
            check(f"chart-managed control secret, 32+ URL-safe characters: {name}", len(value) >= 32 and value.isalnum())
        check(f"workload URL carries the capability: {name}", wenv.get("DATABRICKS_METADATA_SERVICE_URL", "").endswith("/$(PAT_CONTROL_SECRET)/v1/databricks/token"))
        check(f"workload points at the sidecar: {name}", wenv.get("DATABRICKS_METADATA_SERVICE_URL", "").startswith("http://127.0.0.1:") and wenv.get("DATABRICKS_CONFIG_FILE", "").startswith(merged["configDir"]) and wenv.get("DATABRICKS_AUTH_TYPE") == "metadata-service")
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        check(f"prometheus scrape annotations: {name}", annotations.get("prometheus.io/scrape") == "true")

    # The checks must be able to fail.
    # Each bad value set with the words its error must contain: the schema must reject it for
    # the right reason (a render that failed for any other cause would not count).
    bad_sets = {
        "wrong type (tokenLifetime: 'abc')": (merge(REQUIRED, {"rotation": {"tokenLifetime": "abc"}}), "tokenLifetime"),
        "unknown key (rotation.bogus)": (merge(REQUIRED, {"rotation": {"bogus": 1}}), "bogus"),
        "unknown sidecarMode": (merge(REQUIRED, {"sidecarMode": "sometimes"}), "sidecarMode"),
        "unknown store": (merge(REQUIRED, {"store": "s3"}), "store"),
        "unknown key (metrics.prometheusRule.bogus)": (merge(REQUIRED, {"metrics": {"prometheusRule": {"bogus": True}}}), "bogus"),
    }
    for name, (values, key) in bad_sets.items():
        errors = helm_lint_errors(chart, values)
        check(f"schema rejects {name} (helm lint)", errors and "schema" in str(errors).lower() and key in str(errors), errors)
        try:
            render(chart, values)
            check(f"schema rejects {name} (render)", False, "rendered anyway")
        except Exception as e:  # noqa: BLE001 - the render's error is what is checked
            check(f"schema rejects {name} (render)", "schema" in str(e).lower() and key in str(e), repr(e)[:300])
        ok, detail = sdkpy_lint_ok(chart, values)
        # helm-sdkpy's messages carry no text (Go errors serialise as {}): the error must at
        # least be on values.yaml, where the schema is applied.
        check(f"schema rejects {name} (helm-sdkpy Lint)", not ok and '"Severity": 3, "Path": "values.yaml"' in detail, detail)
    # Helm's lint mode only logs `fail`; rendering (install, template) refuses.
    for missing, values in {"host": {"databricks": {"bootstrapSecret": {"name": "x"}}}, "bootstrap Secret": {"databricks": {"host": "https://h"}}}.items():
        try:
            render(chart, values)
            check(f"a missing {missing} is refused at render", False, "rendered anyway")
        except Exception as e:  # noqa: BLE001
            check(f"a missing {missing} is refused at render", "required" in str(e), repr(e)[:200])

    broken_root = tempfile.mkdtemp()
    broken = os.path.join(broken_root, "pat-rotator")
    shutil.copytree(chart, broken)
    with open(os.path.join(broken, "templates", "broken.yaml"), "w") as f:
        f.write("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Values.image.repository \n")
    check("a broken template copy fails helm lint", helm_lint_errors(broken, REQUIRED))
    ok, _ = sdkpy_lint_ok(broken, REQUIRED)
    check("a broken template copy fails helm-sdkpy Lint", not ok)
    shutil.rmtree(broken_root, ignore_errors=True)

    failed = sum(1 for _, ok in results if not ok)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
