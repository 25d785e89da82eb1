#!/usr/bin/env bash
# A five-minute tour: keyward and Envoy on this machine, then a full key
# rotation with no downtime — old key works, rotate, both work (the old one
# gets Deprecation/Sunset), check usage, revoke, old key denied.
#
#   ./scripts/demo.sh
#
# Needs Rust, Python 3 and curl; installs Envoy 1.40 on first run (cached).
# Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${KEYWARD_BIN:-}" ]]; then
    cargo build --quiet --bin keyward
    KEYWARD_BIN="$PWD/target/debug/keyward"
fi
ENVOY="$(./scripts/envoy.sh)"
source scripts/lib.sh
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" >&2; "$@"; }
expect_status() { # expect_status WANT SECRET PATH
    local got
    got="$(curl -s -o "$work/body" -w '%{http_code}' -H "x-api-key: $2" "http://127.0.0.1:$envoy_port$3")"
    printf '  %s %s -> %s %s\n' "${2:0:12}…" "$3" "$got" "$(cat "$work/body" | head -c 80)"
    if [[ "$got" != "$1" ]]; then
        echo "demo failed: expected $1, got $got" >&2
        exit 1
    fi
}
wait_for() { # wait_for URL
    for _ in $(seq 1 100); do
        curl -s -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "demo failed: $1 never answered" >&2
    exit 1
}

wait_generation() { # wait_generation N: until keyward serves ring generation N
    for _ in $(seq 1 100); do
        curl -s "http://127.0.0.1:$admin_port/ring" | grep -q "\"generation\":$1[,}]" && return 0
        sleep 0.05
    done
    echo "demo failed: keyward never reached generation $1" >&2
    exit 1
}

grpc_port="$(free_port)"; admin_port="$(free_port)"; app_port="$(free_port)"
envoy_port="$(free_port)"; envoy_admin="$(free_port)"
keys="$work/keys.toml"

step "1. Issue a key for the client acme"
old="$(run "$KEYWARD_BIN" keys new --file "$keys" --client acme --id acme-v1 --scopes read,trade)"

step "2. Start keyward, an app and Envoy"
"$KEYWARD_BIN" serve --keys "$keys" --listen "127.0.0.1:$grpc_port" --admin "127.0.0.1:$admin_port" \
    2> "$work/keyward.log" &
pids+=($!)
mkdir -p "$work/app/trade"
echo "prices" > "$work/app/index.html"
echo "order placed" > "$work/app/trade/orders"
python3 -m http.server "$app_port" --bind 127.0.0.1 --directory "$work/app" > "$work/app.log" 2>&1 &
pids+=($!)
sed -e "s/port_value: 10000/port_value: $envoy_port/" -e "s/port_value: 9901/port_value: $envoy_admin/" \
    -e "s/port_value: 50051/port_value: $grpc_port/" -e "s/port_value: 8080/port_value: $app_port/" \
    envoy/envoy.yaml > "$work/envoy.yaml"
"$ENVOY" -c "$work/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning > "$work/envoy.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$admin_port/readyz"
wait_for "http://127.0.0.1:$app_port/"
for _ in $(seq 1 100); do
    [[ "$(curl -s "http://127.0.0.1:$envoy_admin/ready" || true)" == "LIVE" ]] && break
    sleep 0.1
done
echo "  keyward on 127.0.0.1:$grpc_port, Envoy on 127.0.0.1:$envoy_port"

step "3. acme calls with its key"
expect_status 200 "$old" /
expect_status 200 "$old" /trade/orders
expect_status 401 "kw_not_a_real_key" /

step "4. Rotate acme's key (the old one keeps working for an hour)"
new="$(run "$KEYWARD_BIN" keys rotate --file "$keys" --client acme --id acme-v2 --grace 1h)"
wait_generation 2   # keyward picks the edit up in tens of milliseconds

step "5. Both keys work; the old key's responses say it is being retired"
expect_status 200 "$new" /trade/orders
expect_status 200 "$old" /trade/orders
curl -s -o /dev/null -D - -H "x-api-key: $old" "http://127.0.0.1:$envoy_port/" | grep -iE '^(deprecation|sunset):' | sed 's/^/  /'
curl -s -o /dev/null -D - -H "x-api-key: $old" "http://127.0.0.1:$envoy_port/" | grep -qi '^deprecation:' \
    || { echo "demo failed: no Deprecation header" >&2; exit 1; }

step "6. Watch usage move to the new key"
expect_status 200 "$new" /
run "$KEYWARD_BIN" status --admin "127.0.0.1:$admin_port" --idle 1m

step "7. Retire the old key"
run "$KEYWARD_BIN" keys revoke --file "$keys" --id acme-v1
wait_generation 3
expect_status 401 "$old" /
grep -q revoked_key "$work/body" || { echo "demo failed: expected revoked_key" >&2; exit 1; }
expect_status 200 "$new" /trade/orders

step "Done: acme moved to a new key without a single failed request."
