#!/usr/bin/env bash
# Every test: formatting, lints, unit and integration tests, the official Python SDK and the
# openai client as real clients, the short soaks, the cluster store on a real Kubernetes API
# server, and the Helm chart checks. Installs what it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
# The cluster-store tests run on a real Kubernetes API server (the shared envtest beside this
# checkout); where it is, they must run.
envtest=../shared/envtest
if [ -x "$envtest/setup.sh" ]; then
  echo "== envtest: a real kube-apiserver and etcd for the cluster-store tests"
  KUBEBUILDER_ASSETS=$("$envtest/setup.sh")
  export KUBEBUILDER_ASSETS PAT_REQUIRE_ENVTEST=1
  command -v kubectl >/dev/null || { echo "error: the cluster tests need kubectl on PATH" >&2; exit 1; }
else
  echo "note: $envtest not found: the cluster-store tests are skipped (put the shared envtest beside the checkout; KUBEBUILDER_ASSETS = what its setup.sh prints)"
fi
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test --all-targets"
cargo test --all-targets

echo "== the official Databricks SDK and the openai client for Python as real clients"
venv=target/sdk-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import databricks.sdk, openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'databricks-sdk==0.156.0' 'openai==3.57.0'
fi
cargo build --quiet
"$venv/bin/python" tests/sdk/long_lived_client.py target/debug/pat-rotator
"$venv/bin/python" tests/sdk/openai_proxy.py target/debug/pat-rotator

echo "== the Helm chart: Helm 4 lint and render, kubernetes-validate --strict, and checks that must fail"
helm_venv=target/helm-venv
if [ ! -x "$helm_venv/bin/python" ] || ! "$helm_venv/bin/python" -c 'import helm_python, helm_sdkpy, kubernetes_validate, yaml' 2>/dev/null; then
  py312=""
  for candidate in python3.13 python3.12 /root/.pyenv/versions/3.12*/bin/python3 /root/.pyenv/versions/3.13*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      py312=$candidate
      break
    fi
  done
  if [ -z "$py312" ]; then
    echo "error: the Helm checks need Python 3.12 or later (helm-sdkpy); none found" >&2
    exit 1
  fi
  rm -rf "$helm_venv"
  "$py312" -m venv "$helm_venv"
  "$helm_venv/bin/pip" install --quiet --disable-pip-version-check 'helm-python-sdk==0.2.2' 'helm-sdkpy==0.1.32' 'kubernetes-validate==1.37.0' pyyaml
fi
"$helm_venv/bin/python" tests/helm/check_chart.py helm/pat-rotator
echo "== the chart's Role on a real API server: enough for the cluster store, and a missing verb reported"
"$helm_venv/bin/python" tests/helm/rbac_envtest.py target/debug/pat-rotator helm/pat-rotator
