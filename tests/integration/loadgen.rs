//! `keyward-loadgen` against the real server: what it counts and verifies
//! must match what the server decided.

use keyward::server::Config;
use std::process::Command;

use crate::util::{KeyDir, Running, Secrets, standard_ring};

async fn loadgen(server: &Running, args: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward-loadgen"));
    cmd.args(["--target", &server.endpoint(), "--json", "--warmup", "0s"])
        .args(["--duration", "1s", "--connections", "2", "--streams", "8"])
        .args(args);
    // The server runs on this test's runtime: wait for the child elsewhere.
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("keyward-loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), report)
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `--timeline` uses.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_verifies_what_the_server_decided() {
    let keys = KeyDir::new(&standard_ring());
    let mut config = Config::new(&keys.path);
    // Invalid keys from one address would otherwise end in a lockout (429).
    config.lockout.threshold = 0;
    let server = Running::start_with(config).await;

    // A valid key with the route's scope, and 30 % random invalid keys.
    let timeline = keys.dir.path().join("timeline.txt");
    let before = monotonic_ns();
    let (code, r) = loadgen(
        &server,
        &[
            "--key",
            Secrets::ACTIVE,
            "--invalid-fraction",
            "0.3",
            "--verify",
            "--timeline",
            timeline.to_str().expect("utf-8 path"),
        ],
    )
    .await;
    let after = monotonic_ns();
    assert_eq!(code, 0, "{r}");
    let requests = r["requests"].as_u64().unwrap();
    let (allowed, denied) = (
        r["allowed"].as_u64().unwrap(),
        r["denied"].as_u64().unwrap(),
    );
    assert!(requests > 100, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(allowed + denied, requests, "{r}");
    assert!(allowed > 0 && denied > 0, "{r}");
    // The server saw at least as many allowed checks as were counted
    // (warmup is 0s, but calls still in flight at the end are not counted).
    let served = server.shared.stats.allowed();
    assert!(
        served >= allowed,
        "server allowed {served}, loadgen counted {allowed}"
    );

    // The timeline lists every counted call, in order, on this process's
    // monotonic clock, with the outcome the report counted.
    let text = std::fs::read_to_string(&timeline).expect("timeline written");
    let calls: Vec<(u64, u64, &str)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 3, "{l}");
            (f[0].parse().expect(l), f[1].parse().expect(l), f[2])
        })
        .collect();
    assert_eq!(calls.len() as u64, requests);
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0), "not in order");
    assert!(calls[0].0 > before && calls[calls.len() - 1].0 < after);
    assert!(calls.iter().all(|c| c.1 >= 1));
    let count = |letter| calls.iter().filter(|c| c.2 == letter).count() as u64;
    assert_eq!((count("A"), count("D"), count("E")), (allowed, denied, 0));

    // A key without the route's scope is denied with 403: a mismatch for a
    // key given as valid, and exit status 1.
    let (code, r) = loadgen(&server, &["--key", Secrets::READER, "--verify"]).await;
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["mismatches"], r["requests"], "{r}");
    assert_eq!(r["allowed"], 0, "{r}");

    // The same key on a route that needs only `read` is allowed.
    let (code, r) = loadgen(
        &server,
        &[
            "--key",
            Secrets::READER,
            "--verify",
            "--required-scopes",
            "read",
        ],
    )
    .await;
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["denied"], 0, "{r}");
    server.stop().await;
}
