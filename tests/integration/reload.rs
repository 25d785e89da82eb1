//! Hot reload against the real server: every way a key file gets replaced.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use keyward::server::Config;
use tonic::transport::Channel;

use crate::util::{ChildGuard, KeyDir, Running, eventually, sha};

fn key(id: &str, secret: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nclient = \"c\"\nsha256 = \"{}\"\n\n",
        sha(secret)
    )
}

fn check_request(secret: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    headers: HashMap::from([("x-api-key".to_owned(), secret.to_owned())]),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

/// The key id that `secret` is allowed as, or the denial code.
async fn decide(client: &mut AuthorizationClient<Channel>, secret: &str) -> Result<String, String> {
    let resp = client
        .check(check_request(secret))
        .await
        .expect("check RPC")
        .into_inner();
    match resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => Ok(ok
            .headers
            .iter()
            .find_map(|h| {
                h.header
                    .as_ref()
                    .filter(|h| h.key == "x-keyward-key-id")
                    .map(|h| h.value.clone())
            })
            .unwrap_or_default()),
        Some(HttpResponse::DeniedResponse(d)) => Err(d.body),
        None => panic!("empty response"),
    }
}

async fn client(server: &Running) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap()
}

/// Waits until `secret` is allowed; returns how long that took.
async fn until_allowed(client: &mut AuthorizationClient<Channel>, secret: &str) -> Duration {
    let start = Instant::now();
    eventually(
        Duration::from_secs(5),
        &format!("{secret} to be allowed"),
        || {
            let mut c = client.clone();
            async move { decide(&mut c, secret).await.ok().map(|_| ()) }
        },
    )
    .await;
    start.elapsed()
}

/// Truncates `path` and writes `text` into the same inode (as `>` in a
/// shell or many editors do), synced; the handle stays open for more.
fn write_in_place(path: &Path, text: &str) -> std::fs::File {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.sync_all().unwrap();
    f
}

async fn ring_status(server: &Running) -> serde_json::Value {
    reqwest::get(format!("http://{}/ring", server.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn in_place_write_is_picked_up() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let server = Running::start(&keys.path).await;
    let mut c = client(&server).await;
    assert_eq!(
        decide(&mut c, "secret-b").await,
        Err(r#"{"error":"unknown_key"}"#.into())
    );

    drop(write_in_place(
        &keys.path,
        &(key("a", "secret-a") + &key("b", "secret-b")),
    ));
    let took = until_allowed(&mut c, "secret-b").await;
    eprintln!("in-place write serving after {took:?}");
    assert_eq!(decide(&mut c, "secret-a").await, Ok("a".into()));
    assert_eq!(ring_status(&server).await["generation"], 2);
    server.stop().await;
}

#[tokio::test]
async fn rename_over_is_picked_up() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let server = Running::start(&keys.path).await;
    let mut c = client(&server).await;
    let tmp = keys.dir.path().join(".keys.toml.tmp");
    std::fs::write(&tmp, key("b", "secret-b")).unwrap();
    std::fs::rename(&tmp, &keys.path).unwrap();
    let took = until_allowed(&mut c, "secret-b").await;
    eprintln!("rename-over serving after {took:?}");
    assert_eq!(
        decide(&mut c, "secret-a").await,
        Err(r#"{"error":"unknown_key"}"#.into())
    );
    server.stop().await;
}

#[tokio::test]
async fn delete_keeps_serving_and_recreate_is_picked_up() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let server = Running::start(&keys.path).await;
    let mut c = client(&server).await;
    std::fs::remove_file(&keys.path).unwrap();
    let status = eventually(Duration::from_secs(5), "deletion recorded", || async {
        let s = ring_status(&server).await;
        s["last_reload_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot read key file"))
            .then_some(s)
    })
    .await;
    assert_eq!(status["generation"], 1);
    assert_eq!(
        decide(&mut c, "secret-a").await,
        Ok("a".into()),
        "old ring keeps serving"
    );

    std::fs::write(&keys.path, key("b", "secret-b")).unwrap();
    until_allowed(&mut c, "secret-b").await;
    let status = ring_status(&server).await;
    assert!(status["last_reload_error"].is_null(), "{status}");
    server.stop().await;
}

/// Replays the exact sequence of Kubernetes' atomic writer for Secret and
/// ConfigMap volumes: files live in a timestamped directory, `..data` points
/// at it, and the visible `keys.toml` is a symlink to `..data/keys.toml`. An
/// update writes a new timestamped directory, points `..data_tmp` at it,
/// renames `..data_tmp` over `..data`, and removes the old directory.
#[cfg(unix)]
#[tokio::test]
async fn kubernetes_secret_volume_swap_is_picked_up() {
    use std::os::unix::fs::symlink;

    fn write_version(vol: &Path, name: &str, contents: &str) {
        let dir = vol.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("keys.toml"), contents).unwrap();
    }

    let vol = tempfile::tempdir().unwrap();
    let v = vol.path();
    write_version(v, "..2026_11_27_10_00_00.000000001", &key("a", "secret-a"));
    symlink("..2026_11_27_10_00_00.000000001", v.join("..data")).unwrap();
    symlink("..data/keys.toml", v.join("keys.toml")).unwrap();

    let server = Running::start(&v.join("keys.toml")).await;
    let mut c = client(&server).await;
    assert_eq!(decide(&mut c, "secret-a").await, Ok("a".into()));

    for (i, (id, secret)) in [("b", "secret-b"), ("c", "secret-c")]
        .into_iter()
        .enumerate()
    {
        let old = std::fs::read_link(v.join("..data")).unwrap();
        let new = format!("..2026_11_27_10_0{}_00.00000000{}", i + 1, i + 2);
        write_version(v, &new, &key(id, secret));
        symlink(&new, v.join("..data_tmp")).unwrap();
        std::fs::rename(v.join("..data_tmp"), v.join("..data")).unwrap();
        std::fs::remove_dir_all(v.join(old)).unwrap();
        let took = until_allowed(&mut c, secret).await;
        eprintln!("..data swap serving after {took:?}");
    }
    assert_eq!(ring_status(&server).await["generation"], 3);
    server.stop().await;
}

/// A writer that pauses in the middle (a script's `>` redirection, a slow
/// copy): the half-written file is never served, the whole one is, once.
#[tokio::test]
async fn a_slow_write_in_place_is_served_once_it_is_finished() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let server = Running::start(&keys.path).await;
    let mut c = client(&server).await;
    // A valid file so far, which a reload must not take for the whole.
    let mut f = write_in_place(&keys.path, &(key("a", "secret-a") + &key("b", "secret-b")));
    // The writer pauses (well past the debounce of 20-60 ms, well within
    // the 1 s a write in progress is given).
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.write_all(key("c", "secret-c").as_bytes()).unwrap();
    drop(f);
    until_allowed(&mut c, "secret-c").await;
    assert_eq!(decide(&mut c, "secret-b").await, Ok("b".into()));
    assert_eq!(
        ring_status(&server).await["generation"],
        2,
        "one ring published, from the finished file"
    );
    server.stop().await;
}

/// The key file's directory renamed away and another renamed into its
/// place (a deployment tool swapping directories): with polling off, the
/// watch sees the swap and then follows the new directory.
#[tokio::test]
async fn a_replaced_directory_is_watched_afresh() {
    let root = tempfile::tempdir().unwrap();
    let current = root.path().join("current");
    std::fs::create_dir(&current).unwrap();
    std::fs::write(current.join("keys.toml"), key("a", "secret-a")).unwrap();
    let mut config = Config::new(current.join("keys.toml"));
    config.poll_interval = None;
    let server = Running::start_with(config).await;
    let mut c = client(&server).await;
    let next = root.path().join("next");
    std::fs::create_dir(&next).unwrap();
    std::fs::write(next.join("keys.toml"), key("b", "secret-b")).unwrap();
    std::fs::rename(&current, root.path().join("old")).unwrap();
    // The new directory comes a while later: a reload in between finds no
    // file, and the watch must still see the new one arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::rename(&next, &current).unwrap();
    until_allowed(&mut c, "secret-b").await;
    // An edit in the new directory is seen too.
    std::fs::write(current.join("keys.toml"), key("c", "secret-c")).unwrap();
    until_allowed(&mut c, "secret-c").await;
    server.stop().await;
}

/// `--keys …/current/keys.toml` with `current` a link re-pointed from one
/// release directory to the next (`ln -sfn v2 current`): with polling off,
/// the watch sees the link change and then follows the new directory.
#[cfg(unix)]
#[tokio::test]
async fn a_re_pointed_directory_link_is_followed() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for (dir, id) in [("v1", "a"), ("v2", "b")] {
        std::fs::create_dir(r.join(dir)).unwrap();
        std::fs::write(
            r.join(dir).join("keys.toml"),
            key(id, &format!("secret-{id}")),
        )
        .unwrap();
    }
    symlink("v1", r.join("current")).unwrap();
    let mut config = Config::new(r.join("current/keys.toml"));
    config.poll_interval = None;
    let server = Running::start_with(config).await;
    let mut c = client(&server).await;
    symlink("v2", r.join("current.tmp")).unwrap();
    std::fs::rename(r.join("current.tmp"), r.join("current")).unwrap();
    until_allowed(&mut c, "secret-b").await;
    std::fs::write(r.join("v2/keys.toml"), key("c", "secret-c")).unwrap();
    until_allowed(&mut c, "secret-c").await;
    server.stop().await;
}

/// A server with polling off following `keys.toml -> real/prod.toml`
/// (holding key `a`): the directory, the target, the server.
#[cfg(unix)]
async fn behind_a_link() -> (tempfile::TempDir, std::path::PathBuf, Running) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    let target = dir.path().join("real/prod.toml");
    std::fs::write(&target, key("a", "secret-a")).unwrap();
    let link = dir.path().join("keys.toml");
    std::os::unix::fs::symlink("real/prod.toml", &link).unwrap();
    let mut config = Config::new(&link);
    config.poll_interval = None;
    (dir, target, Running::start_with(config).await)
}

/// `keys.toml -> real/prod.toml`, the target deleted and written again a
/// while later (a tool that unlinks first): with polling off, the new file
/// is still found, though the link pointed nowhere in between.
#[cfg(unix)]
#[tokio::test]
async fn a_link_whose_target_comes_back_is_followed() {
    let (_dir, target, server) = behind_a_link().await;
    let mut c = client(&server).await;
    std::fs::remove_file(&target).unwrap();
    eventually(Duration::from_secs(5), "the deletion seen", || async {
        ring_status(&server).await["last_reload_error"]
            .is_object()
            .then_some(())
    })
    .await;
    std::fs::write(&target, key("b", "secret-b")).unwrap();
    until_allowed(&mut c, "secret-b").await;
    server.stop().await;
}

#[tokio::test]
async fn bad_files_never_replace_the_ring() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let server = Running::start(&keys.path).await;
    let mut c = client(&server).await;
    let bad: Vec<(String, &str)> = vec![
        ("[[keys]\nid = \"x\"\n".into(), "keys.toml:1:"),
        (
            key("a", "secret-a") + "expire_at = 2027-01-01T00:00:00Z\n",
            "keys.toml:6:1: unknown field `expire_at`",
        ),
        (
            "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"abc\"\n".into(),
            "keys.toml:4:10:",
        ),
        (
            key("a", "secret-a") + &key("a", "secret-b"),
            "duplicate id \"a\"",
        ),
        (key("a", "secret-a") + &key("b", "secret-a"), "same sha256"),
        (String::new(), "--allow-empty"),
    ];
    for (i, (contents, expected)) in bad.into_iter().enumerate() {
        std::fs::write(&keys.path, &contents).unwrap();
        let status = eventually(Duration::from_secs(5), expected, || async {
            let s = ring_status(&server).await;
            s["last_reload_error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(expected))
                .then_some(s)
        })
        .await;
        assert_eq!(status["generation"], 1, "case {i}");
        assert_eq!(
            status["reloads"]["failure"].as_u64(),
            Some(i as u64 + 1),
            "{status}"
        );
        assert!(
            status["last_reload_error"]["message"]
                .as_str()
                .unwrap()
                .contains(&keys.path.display().to_string())
        );
        assert_eq!(
            decide(&mut c, "secret-a").await,
            Ok("a".into()),
            "old ring keeps serving"
        );
    }
    std::fs::write(&keys.path, key("b", "secret-b")).unwrap();
    until_allowed(&mut c, "secret-b").await;
    server.stop().await;
}

#[tokio::test]
async fn polling_fallback_without_inotify() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let mut config = Config::new(&keys.path);
    config.watch = false;
    config.poll_interval = Some(Duration::from_millis(100));
    let server = Running::start_with(config).await;
    let mut c = client(&server).await;
    std::fs::write(&keys.path, key("b", "secret-b")).unwrap();
    let took = until_allowed(&mut c, "secret-b").await;
    eprintln!("poll (100ms) serving after {took:?}");
    server.stop().await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_file_behind_a_symlink_into_a_subdirectory_is_followed() {
    // keys.toml -> real/prod.toml, edited where the link points (as
    // `keyward keys` does): inotify alone must see it.
    let (dir, target, server) = behind_a_link().await;
    let mut c = client(&server).await;
    let tmp = dir.path().join("real/.prod.toml.tmp");
    std::fs::write(&tmp, key("b", "secret-b")).unwrap();
    std::fs::rename(&tmp, &target).unwrap();
    let took = until_allowed(&mut c, "secret-b").await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    server.stop().await;
}

#[tokio::test]
async fn polling_finds_a_change_that_kept_the_metadata() {
    // Same length and modification time, as a tool that restores the time
    // leaves it: only the content poll sees the new key.
    let keys = KeyDir::new(&key("a", "secret-a"));
    let mut config = Config::new(&keys.path);
    config.watch = false;
    config.poll_interval = Some(Duration::from_millis(50));
    let server = Running::start_with(config).await;
    let mut c = client(&server).await;
    let modified = std::fs::metadata(&keys.path).unwrap().modified().unwrap();
    let next = key("b", "secret-b");
    assert_eq!(next.len(), key("a", "secret-a").len());
    // One handle, so that the new content and the old time land a few
    // microseconds apart, between two polls.
    let mut file = std::fs::File::options()
        .write(true)
        .truncate(true)
        .open(&keys.path)
        .unwrap();
    std::io::Write::write_all(&mut file, next.as_bytes()).unwrap();
    file.set_modified(modified).unwrap();
    drop(file);
    let took = until_allowed(&mut c, "secret-b").await;
    eprintln!("content poll (every 6 x 50ms) serving after {took:?}");
    server.stop().await;
}

#[cfg(unix)]
#[test]
fn sighup_reloads() {
    let keys = KeyDir::new(&key("a", "secret-a"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args([
            "--no-watch",
            "--poll-interval",
            "1h",
            "--log-format",
            "json",
            "--keys",
        ])
        .arg(&keys.path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut child = ChildGuard(child);
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let wait_for = |pred: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("log line not seen in 10s"),
            }
        }
    };
    wait_for(&|v| v["message"] == "keyward serving");
    std::fs::write(&keys.path, key("a", "secret-a") + &key("b", "secret-b")).unwrap();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let audit = wait_for(&|v| v["message"] == "key ring published");
    assert_eq!(audit["trigger"], "signal");
    assert_eq!(audit["generation"], 2);
    assert_eq!(audit["added"], "[\"b\"]");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert!(child.0.wait().unwrap().success());
}

/// Checks never fail or see a half-built ring while rings are published
/// continuously (well over 50 a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_never_fail_while_rings_are_replaced() {
    let mut text = key("stable", "secret-stable");
    for i in 0..200 {
        text.push_str(&key(&format!("filler-{i}"), &format!("filler-secret-{i}")));
    }
    let keys = KeyDir::new(&text);
    let server = Running::start(&keys.path).await;
    let reloader_shared = Arc::clone(&server.shared);
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));

    // Publisher: alternate between two rings as fast as it can, 100/s at least.
    let publisher = {
        let stop = Arc::clone(&stop);
        let published = Arc::clone(&published);
        let text = text.clone();
        std::thread::spawn(move || {
            use keyward::keyfile::{ParseOptions, parse_str};
            use keyward::ring::{KeyRing, RingSource};
            let with_extra = text.clone() + &key("extra", "secret-extra");
            let files = [
                parse_str(&text, ParseOptions::default()).unwrap(),
                parse_str(&with_extra, ParseOptions::default()).unwrap(),
            ];
            let mut generation = 1;
            while !stop.load(Ordering::Relaxed) {
                generation += 1;
                let file = &files[generation as usize % 2];
                let current = reloader_shared.ring.load_full();
                let source = RingSource {
                    generation,
                    sha256: [generation as u8; 32],
                    loaded_at: jiff::Timestamp::now(),
                };
                let ring = KeyRing::build(file, source, &reloader_shared.usage, Some(&current));
                // Held here, the replaced ring would be waited for.
                drop(current);
                reloader_shared.ring.publish(ring);
                published.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = client(&server).await;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(2) {
                assert_eq!(decide(&mut c, "secret-stable").await, Ok("stable".into()));
                match decide(&mut c, "secret-extra").await {
                    Ok(id) => assert_eq!(id, "extra"),
                    Err(e) => assert_eq!(e, r#"{"error":"unknown_key"}"#),
                }
                n += 2;
            }
            n
        }));
    }
    let mut checks = 0;
    for t in tasks {
        checks += t.await.expect("no check failed");
    }
    stop.store(true, Ordering::Relaxed);
    publisher.join().unwrap();
    let rings = published.load(Ordering::Relaxed);
    let rate = rings as f64 / started.elapsed().as_secs_f64();
    eprintln!("{checks} checks while publishing {rings} rings ({rate:.0}/s)");
    assert!(rate > 50.0, "publisher managed only {rate:.0} rings/s");
    server.stop().await;
}
