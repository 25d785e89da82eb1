#!/usr/bin/env bash
# Instructions per Check: a measure of server cost that the machine's noise
# cannot move.
#
#   scripts/bench-instructions.sh [CHECKS]      # default 20000
#
# Runs keyward, the minimal tonic server, the transport floor and the floor
# answering with keyward's response (`bench-floor --keyward-keys`), one at a
# time, under valgrind's callgrind, and drives each with h2load (nghttp2) over
# 2 connections x 64 streams, every request the CheckRequest Envoy 1.40 sent
# (tests/data/envoy-1.40-check-request.bin, carrying a valid key). After a
# warmup, callgrind's counters are zeroed, CHECKS checks run, and the
# user-space instructions they took are divided by CHECKS.
#
# Kernel work (syscalls, scheduling) is not counted, and an instruction is
# not a fixed time, so this complements CPU time per check
# (scripts/bench-compare.sh); it does not replace it. Its use: comparing two
# builds, or two servers, on a shared machine where CPU time drifts.
#
# Needs valgrind and h2load (apt-get install valgrind nghttp2-client).
# Traffic goes to 127.0.0.1 only. Writes the callgrind profiles to
# target/bench-instructions/ (read them with callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."

checks="${1:-20000}"
for tool in valgrind callgrind_control h2load; do
    command -v "$tool" >/dev/null || { echo "error: needs $tool (apt-get install valgrind nghttp2-client)" >&2; exit 1; }
done
cargo build --release --quiet --bin keyward --bin bench-minimal-authz --bin bench-floor
bin="$PWD/target/release"
source scripts/lib.sh
out="target/bench-instructions"
mkdir -p "$out"

# The captured request as one gRPC frame, and a ring holding its key.
python3 - tests/data/envoy-1.40-check-request.bin "$work/body" "$work/keys.toml" <<'EOF'
import hashlib, struct, sys
src, body, keys = sys.argv[1:]
message = open(src, "rb").read()
open(body, "wb").write(b"\0" + struct.pack(">I", len(message)) + message)
digest = hashlib.sha256(b"captured-key-0123").hexdigest()
open(keys, "w").write(f'[[keys]]\nid = "captured"\nclient = "acme"\nsha256 = "{digest}"\n'
                      'scopes = ["read", "trade"]\n')
EOF

load() {
    h2load -n "$2" -c 2 -m 64 -t 1 -H 'content-type: application/grpc' -H 'te: trailers' \
        -d "$work/body" "http://127.0.0.1:$1/envoy.service.auth.v3.Authorization/Check" |
        awk '/^status codes/ { print $3 }'
}

declare -A result
for server in keyward minimal floor floor_kw; do
    port="$(free_port)"
    case "$server" in
        keyward) cmd=("$bin/keyward" serve --keys "$work/keys.toml" --listen "127.0.0.1:$port"
                      --admin 127.0.0.1:0 --lockout-threshold 0) ;;
        minimal) cmd=("$bin/bench-minimal-authz" --listen "127.0.0.1:$port" --token captured-key-0123) ;;
        floor) cmd=("$bin/bench-floor" --listen "127.0.0.1:$port") ;;
        floor_kw) cmd=("$bin/bench-floor" --listen "127.0.0.1:$port" --keyward-keys "$work/keys.toml"
                       --keyward-key captured-key-0123) ;;
    esac
    rm -f "$out/callgrind.$server".*
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.$server.%p" "${cmd[@]}" \
        >/dev/null 2>"$work/$server.log" &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/$server.log" >&2; exit 1; }
        sleep 0.05
    done
    load "$port" 3000 >/dev/null
    callgrind_control --zero "$pid" >/dev/null 2>&1
    ok="$(load "$port" "$checks")"
    callgrind_control --dump="measured" "$pid" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true
    [[ "$ok" == "$checks" ]] || { echo "error: $server answered $ok of $checks checks with 2xx" >&2; exit 1; }
    # The dump after zeroing holds only the measured checks.
    dump="$(grep -l '^desc: Trigger: .*measured' "$out/callgrind.$server".* | head -n 1)"
    total="$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")"
    result[$server]="$((total / checks))"
    echo "$server: $((total / checks)) instructions per check ($checks checks, profile $dump)"
done
python3 - "${result[keyward]}" "${result[minimal]}" "${result[floor]}" "${result[floor_kw]}" <<'EOF'
import sys
k, m, f, fk = (int(x) for x in sys.argv[1:])
print(f"keyward/floor {k / f:.2f}x, keyward/floor_kw {k / fk:.2f}x, keyward/minimal {k / m:.2f}x "
      "(user-space instructions per check)")
EOF
