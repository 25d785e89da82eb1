#!/usr/bin/env bash
# A million keys: time to ready, resident memory, reload time, and check
# latency while such a ring is reloaded over and over.
#
#   scripts/bench-1m.sh [KEYS]          # default 1000000 (a ~150 MB key file)
#
# 1. Generates a realistic key file (bench-keyfile) and starts keyward on it;
#    reports the time from exec to /readyz = 200 and VmRSS once ready and
#    after a few seconds of light load (steady state).
# 2. Renames a second version of the file (one description added, so it is
#    a new ring) into place and reports how long until the new generation
#    serves, VmRSS after the swap and the peak VmHWM during the reload,
#    and how long until VmRSS is back within 10 % of steady (keyward keeps
#    the memory a reload freed for 5 s, for the next reload).
# 3. One open-loop run at $RATE req/s for $STORM_SECONDS s (default: time
#    for ten pairs of windows, at least 60), in
#    windows of $WINDOW_MS (default 3x the reload above, at least 1000):
#    steady windows with the file untouched, and storm windows in which the
#    two versions are renamed into place back to back (every reload reads,
#    parses and builds the whole ring). Reports the p99 of all calls in each
#    kind of window and their ratio, with the range that 90 % of resamplings
#    of the pairs of windows give.
#
# TIMELINE_DIR=DIR keeps step 3's calls (timeline.txt: each call's
# scheduled time and latency) and windows (windows.txt) there.
#
# CONTROL=1 runs step 3 with nothing renamed in the "storm" windows: the
# same alternation of windows and the same accounting, no reloads (a
# control's storm windows last exactly WINDOW_MS, a storm's until its last
# reload serves). Its ratio shows how far
# this measurement moves by itself, on this machine, when the two kinds of
# window differ in nothing; a storm's ratio means something only beside it.
#
# Traffic goes to 127.0.0.1 only. Knobs: RATE STORM_SECONDS WINDOW_MS, and
# KEYWARD (the server binary, default target/release/keyward) to measure
# another build, such as an older commit's, with the same load generator.
# SERVER_CPUS and CLIENT_CPUS (taskset(1) CPU lists) pin keyward to one set
# of CPUs and the load generator and the storm's writer to another, so that
# only keyward's own threads compete with its checks:
#
#   SERVER_CPUS=1 CLIENT_CPUS=0 scripts/bench-1m.sh 10000
set -euo pipefail
# Relative to where the script was started, not to the repository.
timeline_dir="${TIMELINE_DIR:+$(realpath -m -- "$TIMELINE_DIR")}"
cd "$(dirname "$0")/.."

n="${1:-1000000}"
rate="${RATE:-2000}"
control="${CONTROL:-0}"
[[ "$control" == [01] ]] || { echo "CONTROL must be 0 or 1, not $control" >&2; exit 1; }
on_server=()
on_client=()
[[ -n "${SERVER_CPUS:-}" ]] && on_server=(taskset -c "$SERVER_CPUS")
[[ -n "${CLIENT_CPUS:-}" ]] && on_client=(taskset -c "$CLIENT_CPUS")

cargo build --release --quiet --bin keyward --bin keyward-loadgen --bin bench-keyfile
bin="$PWD/target/release"
server="${KEYWARD:-$bin/keyward}"
source scripts/lib.sh
rss_mib() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
hwm_mib() { awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
now_ms() { date +%s%3N; }
# Polls the admin port from one process over one kept-alive connection every
# 5 ms: `ready PID` waits for /readyz = 200 and prints the wall clock (ms)
# then; `renamed FROM TO` renames FROM over TO, waits for a new generation
# on /ring and prints the milliseconds between the two. A process per poll (curl, ~200 a second) would
# take CPU from the reload's background threads and lengthen what is measured.
poll_admin() {
    python3 - "$admin" "$@" <<'EOF'
import http.client, json, os, sys, time
port, what = int(sys.argv[1]), sys.argv[2]
conn = None
def get(path):
    global conn
    try:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException):
        conn = None
        return None, b""
def generation():
    status, body = get("/ring")
    if status != 200:
        return None
    try:
        return json.loads(body)["generation"]
    except (ValueError, KeyError):
        return None
deadline = time.monotonic() + 120
def waiting():
    if time.monotonic() >= deadline:
        sys.exit("timed out")
    time.sleep(0.005)
    return True
if what == "ready":
    pid = int(sys.argv[3])
    while get("/readyz")[0] != 200:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("the server exited")
        waiting()
    print(time.time_ns() // 1_000_000)
else:
    while (g := generation()) is None:
        waiting()
    start = time.monotonic()
    os.rename(sys.argv[3], sys.argv[4])
    while (now := generation()) is None or now <= g:
        waiting()
    print(round((time.monotonic() - start) * 1000))
EOF
}

keys="$work/keys.toml"
"$bin/bench-keyfile" --keys "$n" --out "$keys" --secrets "$work/secrets.txt" --secrets-count 200
size_mb="$(du -m "$keys" | cut -f1)"
echo "key file:            $n keys, $size_mb MB"

grpc="$(free_port)"; admin="$(free_port)"
start="$(now_ms)"
${on_server[@]+"${on_server[@]}"} "$server" serve --keys "$keys" --listen "127.0.0.1:$grpc" --admin "127.0.0.1:$admin" \
    --lockout-threshold 0 --poll-interval 0s 2> "$work/keyward.log" &
pid=$!
pids+=("$pid")
ready="$(poll_admin ready "$pid")" || { cat "$work/keyward.log" >&2; exit 1; }
echo "ready after:         $((ready - start)) ms (exec to /readyz = 200)"
echo "resident when ready: $(rss_mib "$pid") MiB"
${on_client[@]+"${on_client[@]}"} "$bin/keyward-loadgen" --target "http://127.0.0.1:$grpc" --keys "$work/secrets.txt" --required-scopes "" \
    --rate 1000 --duration 3s --warmup 1s --verify > /dev/null
echo "resident, steady:    $(rss_mib "$pid") MiB"
steady_kib="$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")"
# After a reload keyward keeps the memory it freed for a few seconds, for a
# reload that may follow (KEEP_MEMORY_FOR in src/reload.rs), then returns
# it. Waits (30 s at most) until the resident set is back within 10 % of
# its steady state and prints how long that took, in ms.
back_to_steady() {
    local start now kib
    start="$(now_ms)"
    while :; do
        kib="$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")"
        now="$(now_ms)"
        if (( kib * 10 <= steady_kib * 11 )); then
            echo "$((now - start))"
            return
        fi
        if (( now - start > 30000 )); then
            echo "more than 30000"
            return
        fi
        sleep 0.1
    done
}

# Two versions of the file that differ in one key's description.
cp "$keys" "$work/a.toml"
python3 - "$keys" "$work/b.toml" <<'EOF'
import sys
src, dst = sys.argv[1], sys.argv[2]
with open(src) as f, open(dst, "w") as out:
    done = False
    for line in f:
        out.write(line)
        if not done and line.startswith("client = "):
            out.write('description = "reloaded"\n')
            done = True
EOF
# Written and flushed first, then renamed into place, as `keyward keys`
# and most configuration tools do: the reload does not share the machine
# with the write-back of 150 MB.
cp "$work/b.toml" "$work/next.toml"
sync
# Writing 5 to clear_refs resets the peak resident set (VmHWM) to the
# current one, so the peak below is the reload's.
echo 5 > "/proc/$pid/clear_refs"
took="$(poll_admin renamed "$work/next.toml" "$keys")"
echo "reload serving after: $took ms (rename to new generation on /ring)"
echo "resident after swap: $(rss_mib "$pid") MiB (peak during the reload: $(hwm_mib "$pid") MiB)"
back="$(back_to_steady)"
echo "resident back to:    $(rss_mib "$pid") MiB, $back ms later"

# 3. Checks while rings are published back to back, against checks with the
# file untouched, interleaved in windows of $WINDOW_MS within one open-loop
# run of $STORM_SECONDS: a storm and a steady state measured minutes apart
# differ by whatever else the machine did meanwhile, often by more than the
# storm does.
window_ms="${WINDOW_MS:-$(( took * 3 > 1000 ? took * 3 : 1000 ))}"
# A pair of windows lasts two windows and up to one reload more (a storm
# window ends when its last reload serves): by default, time for at least
# ten pairs.
pair_ms="$(( 2 * window_ms + took ))"
storm_s="${STORM_SECONDS:-$(( pair_ms * 10 / 1000 > 60 ? pair_ms * 10 / 1000 : 60 ))}"
if (( storm_s * 1000 < 5 * pair_ms )); then
    echo "STORM_SECONDS=$storm_s leaves room for fewer than 4 measured pairs of ${window_ms} ms windows" >&2
    exit 1
fi
# The last reload of a storm window frees the previous ring and the parsed
# file after it is published, in the next window: calls scheduled up to
# $guard_ms into it count with the storm (a reload frees less than it
# builds, so its cleanup takes less time than its $took ms).
guard_ms="$(( took > 100 ? took : 100 ))"
hz="$(getconf CLK_TCK)"
# CPU time the hypervisor gave to others while this VM's CPUs wanted it
# ("steal", summed over CPUs), in ms.
steal_ms() { awk -v hz="$hz" '/^cpu / { printf "%d", $9 * 1000 / hz }' /proc/stat; }
s0="$(steal_ms)"
# One process puts the two versions in place in turn, in storm windows, each
# as soon as the previous one serves: a hard link renamed over the key file,
# as a configuration tool's rename-over save does, with both versions
# written and flushed beforehand. Rewriting 150 MB per ring instead would
# measure the writer: its page-cache copy and write-back alone take the p99
# of checks to about 3x steady on a 2-CPU machine, with keyward not
# reloading at all. It learns that a version serves from the audit record
# keyward writes to its log, read whenever the log grows (it sleeps in
# inotify meanwhile): polling the admin port every 2 ms (a request handled
# on keyward's own threads) took the p99 of checks to about 1.8x steady with
# 10,000-key rings, keyward not reloading, and reading the log on a 2 ms
# timer woke the writer 500 times a second on the CPUs it shares with
# keyward and the load generator. Windows come in pairs, steady then storm
# and storm then steady in turn, so that neither kind always follows the
# other. The writer starts with the load generator's warmup.
${on_client[@]+"${on_client[@]}"} python3 - "$work/keyward.log" "$keys" "$work/a.toml" "$work/b.toml" \
    "$((storm_s + 2))" "$window_ms" "$work/windows.txt" "$control" <<'EOF' &
import ctypes, ctypes.util, os, select, sys, time
log, path, a, b = sys.argv[1:5]
seconds, window_ns, out = float(sys.argv[5]), int(sys.argv[6]) * 1_000_000, sys.argv[7]
control = sys.argv[8] == "1"
published = 0
# Sleep until keyward writes to its log (inotify), not on a timer.
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
IN_MODIFY = 0x2
notify = libc.inotify_init1(os.O_CLOEXEC)
if notify < 0 or libc.inotify_add_watch(notify, os.fsencode(log), IN_MODIFY) < 0:
    sys.exit("the storm's writer needs inotify")
def wait_for_log(until):
    left = until - time.monotonic()
    if left > 0 and select.select([notify], [], [], left)[0]:
        os.read(notify, 65536)
windows = []
with open(log, "rb") as f:
    f.seek(0, os.SEEK_END)
    def serving_count():
        global published
        published += f.read().count(b"key ring published")
        return published
    # The serving file is b's content (the reload above), or whichever went last.
    n = 1 if os.path.samestat(os.stat(path), os.stat(a)) else 0
    tmp = path + ".next"
    def reload():
        global n
        seen = serving_count()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.link((a, b)[n % 2], tmp)
        os.rename(tmp, path)
        deadline = time.monotonic() + 30
        while serving_count() <= seen:
            if time.monotonic() >= deadline:
                sys.exit("a reload did not serve within 30 s")
            wait_for_log(deadline)
        n += 1
    end = time.monotonic_ns() + int(seconds * 1e9)
    pair = 0
    while time.monotonic_ns() < end:
        for storm in ((False, True), (True, False))[pair % 2]:
            start = time.monotonic_ns()
            reloads = 0
            if storm and not control:
                # Back to back; the window ends when its last reload serves.
                while time.monotonic_ns() < start + window_ns:
                    reload()
                    reloads += 1
            else:
                time.sleep(window_ns / 1e9)
            kind = "storm" if storm else "steady"
            windows.append((pair, kind, start, time.monotonic_ns(), reloads))
        pair += 1
with open(out, "w") as o:
    for w in windows:
        print(*w, file=o)
EOF
writer=$!
pids+=("$writer")
# Errors and mismatches make the exit status non-zero; the report says how
# many, below.
${on_client[@]+"${on_client[@]}"} "$bin/keyward-loadgen" --target "http://127.0.0.1:$grpc" --keys "$work/secrets.txt" \
    --required-scopes "" --rate "$rate" --duration "${storm_s}s" --warmup 1s --verify --json \
    --timeline "$work/timeline.txt" > "$work/storm.json" || true
wait "$writer" || { echo "the storm's writer failed" >&2; exit 1; }
stolen="$(( $(steal_ms) - s0 ))"
if [[ -n "$timeline_dir" && -f "$work/timeline.txt" ]]; then
    mkdir -p "$timeline_dir"
    cp "$work/timeline.txt" "$work/windows.txt" "$timeline_dir/"
fi
python3 - "$work/storm.json" "$work/timeline.txt" "$work/windows.txt" "$guard_ms" "$rate" "$stolen" "$window_ms" "$control" <<'EOF'
import bisect, heapq, json, math, random, sys
report, timeline, windows_file = sys.argv[1:4]
guard = int(sys.argv[4]) * 1_000_000
rate, stolen, window_ms = sys.argv[5:8]
control = sys.argv[8] == "1"
try:
    r = json.load(open(report))
except (OSError, ValueError):
    sys.exit("the storm's load generator wrote no report (see its errors above)")
if r["errors"] or r["mismatches"]:
    sys.exit(f"the storm's load had {r['errors']} errors and {r['mismatches']} mismatches")
windows = []
for line in open(windows_file):
    pair, kind, start, end, reloads = line.split()
    windows.append((int(pair), kind, int(start), int(end), int(reloads)))
starts = [w[2] for w in windows]
# A call belongs to the window it was scheduled in (a gap between two
# windows, the writer's own bookkeeping, goes with the window before it),
# except that calls within the guard after a storm window count with it.
by_pair = {}
for line in open(timeline):
    if line.startswith("#"):
        continue
    at, latency, _ = line.split()
    at = int(at)
    i = bisect.bisect_right(starts, at) - 1
    if i < 0 or (i == len(windows) - 1 and at >= windows[i][3]):
        continue
    pair, kind = windows[i][0], windows[i][1]
    if kind == "steady" and i > 0 and windows[i - 1][1] == "storm" and at < windows[i - 1][3] + guard:
        pair, kind = windows[i - 1][0], "storm"
    by_pair.setdefault(pair, {"steady": [], "storm": []})[kind].append(int(latency))
# Only pairs with both halves measured (the run's first and last may not be).
complete = {k for k, p in by_pair.items() if p["steady"] and p["storm"]}
pairs = [by_pair[k] for k in sorted(complete)]
if len(pairs) < 4:
    sys.exit(f"only {len(pairs)} complete pairs of windows: give a longer STORM_SECONDS")
def quantile(xs, q):
    # Nearest rank: the smallest value with at least q of the calls at or below it.
    k = len(xs) - math.ceil(q * len(xs) - 1e-9) + 1
    return heapq.nlargest(k, xs)[-1]
def pooled(ps, kind):
    return [x for p in ps for x in p[kind]]
def ratio(ps, q=0.99):
    return quantile(pooled(ps, "storm"), q) / quantile(pooled(ps, "steady"), q)
# How much the ratio depends on which windows happened to be measured:
# resample whole pairs, since a burst of steal spans a window, not a call.
rng = random.Random(1)
boot = sorted(ratio([rng.choice(pairs) for _ in pairs]) for _ in range(400))
lo, hi = boot[int(0.05 * len(boot))], boot[int(0.95 * len(boot)) - 1]
measured_storms = [w for w in windows if w[0] in complete and w[1] == "storm"]
reloads = sum(w[4] for w in measured_storms)
storm_s = sum(w[3] - w[2] for w in measured_storms) / 1e9
if control:
    print("CONTROL: nothing was renamed in the storm windows; the ratio below is the method's own noise")
print(f"open loop {rate} req/s: {len(pairs)} pairs of {window_ms} ms windows, steady and storm "
      f"interleaved; {reloads} rings published in {storm_s:.0f} s of storm; {stolen} ms of steal")
for kind in ("steady", "storm"):
    xs = pooled(pairs, kind)
    print(f"  {kind:<6} {len(xs):>7} calls: p50 {quantile(xs, 0.5)} µs, p99 {quantile(xs, 0.99)} µs, "
          f"p99.9 {quantile(xs, 0.999)} µs")
print(f"storm p99 / steady p99: {ratio(pairs):.2f}x (90% of resampled pairs: {lo:.2f}-{hi:.2f}x); "
      f"p99.9: {ratio(pairs, 0.999):.2f}x")
EOF
echo "resident at the end: $(rss_mib "$pid") MiB"
# How long the storm's reloads took, from keyward's audit records (all but
# the first, the swap above).
python3 - "$work/keyward.log" <<'EOF'
import re, statistics, sys
rows = [l for l in open(sys.argv[1], errors="replace") if "key ring published" in l][1:]
def ms(name):
    return [int(m.group(1)) for l in rows if (m := re.search(name + r"=(\d+)", l))]
took = ms("took_ms")
if took:
    parts = ", ".join(f"{p} {statistics.median(ms(p + '_ms')):.0f}" for p in ("read", "parse", "build"))
    print(f"storm reloads: {len(took)}, took_ms median {statistics.median(took):.0f} "
          f"({min(took)}-{max(took)}); medians of {parts} ms")
EOF
back="$(back_to_steady)"
echo "resident back to:    $(rss_mib "$pid") MiB, $back ms later"
