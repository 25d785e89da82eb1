#!/usr/bin/env bash
# Soak test: keyward under steady load for minutes while its key file is
# rewritten thousands of times. Every response is verified (a valid key must
# be allowed throughout), and resident memory and open file descriptors must
# stay flat.
#
#   ./scripts/soak.sh [DURATION_SECONDS] [RELOADS_PER_SECOND]
#
# Defaults: 180 s, 20 reloads a second (3,600 reloads). Traffic goes to
# 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${1:-180}"
rate="${2:-20}"
# PROFILE=dev for a quick try without the (slow) optimised build.
profile="${PROFILE:-release}"
cargo build --profile "$profile" --quiet --bin keyward --bin keyward-loadgen
bin="$PWD/target/$([[ "$profile" == dev ]] && echo debug || echo "$profile")"
source scripts/lib.sh
fds() { ls "/proc/$1/fd" | wc -l; }

keys="$work/keys.toml"
secret="$("$bin/keyward" keys new --file "$keys" --client soak --id soak-stable --scopes read,trade 2>/dev/null)"
for i in $(seq 1 200); do
    "$bin/keyward" keys new --file "$keys" --client "filler-$((i % 20))" >/dev/null 2>&1
done
grpc="$(free_port)"; admin="$(free_port)"
# All load comes from one address: lockout off, or the invalid keys in the
# mix would (rightly) lock the load generator out.
"$bin/keyward" serve --keys "$keys" --listen "127.0.0.1:$grpc" --admin "127.0.0.1:$admin" \
    --lockout-threshold 0 --log-format json 2> "$work/keyward.log" &
keyward_pid=$!
pids+=("$keyward_pid")
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done

# Warm up, then take the baseline.
"$bin/keyward-loadgen" --target "http://127.0.0.1:$grpc" --key "$secret" --duration 5s --warmup 1s --verify >/dev/null
rss0="$(rss_kib "$keyward_pid")"; fds0="$(fds "$keyward_pid")"

# Rewrite the file continuously: alternate two versions that differ in a
# comment and in one key's description, so every write is a new ring.
cp "$keys" "$work/a.toml"
sed 's/^description = .*//' "$keys" > "$work/b.toml"
printf '# churn\n[[keys]]\nid = "churn"\nclient = "churn"\nsha256 = "%064d"\ndescription = "b"\n' 1 >> "$work/b.toml"
interval="$(python3 -c "print(1/$rate)")"
(
    n=0
    end=$((SECONDS + duration))
    while (( SECONDS < end )); do
        if (( n % 2 )); then cp "$work/a.toml" "$work/next.toml"; else cp "$work/b.toml" "$work/next.toml"; fi
        mv "$work/next.toml" "$keys"
        n=$((n + 1))
        sleep "$interval"
    done
    echo "$n" > "$work/writes"
) &
pids+=($!)

"$bin/keyward-loadgen" --target "http://127.0.0.1:$grpc" --key "$secret" --invalid-fraction 0.1 \
    --duration "${duration}s" --warmup 0s --verify --connections 2 --streams 32 | tee "$work/load.txt"
wait "${pids[-1]}" || true
rss1="$(rss_kib "$keyward_pid")"; fds1="$(fds "$keyward_pid")"
generation="$(curl -s "http://127.0.0.1:$admin/ring" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')"

echo
echo "file writes:        $(cat "$work/writes")"
echo "rings published:    $((generation - 1))"
echo "resident memory:    ${rss0} KiB -> ${rss1} KiB"
echo "file descriptors:   ${fds0} -> ${fds1}"
# Allow the allocator some slack, but not growth with the number of reloads.
if (( rss1 > rss0 * 3 / 2 + 8192 )); then
    echo "FAIL: resident memory grew" >&2
    exit 1
fi
if (( fds1 > fds0 + 4 )); then
    echo "FAIL: file descriptors leaked" >&2
    exit 1
fi
echo "PASS"
