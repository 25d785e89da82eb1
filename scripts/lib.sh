# Shared by the scripts in this folder; source it after `cd` to the
# repository root. Sets up a scratch directory `$work` and a `pids` array:
# every process whose pid is added to `pids` is stopped, and `$work` removed,
# when the script exits.

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Resident memory of process $1, in KiB.
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
