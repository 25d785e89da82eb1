//! `keyward keys …` end to end, against a running server following the file.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keyward::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use keyward::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keyward::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keyward::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tonic::transport::Channel;

use crate::util::{KeyDir, Running, eventually, sha};

const SEED: &str = r#"# Production key ring for the exchange API.
# Owner: platform team. Edited with `keyward keys`.

# acme's trading bot
[[keys]]
id = "acme-1"  # issued at onboarding
client = "acme"
sha256 = "SHA_ACME"
scopes = ["read", "trade"]
"#;

fn seed() -> String {
    SEED.replace("SHA_ACME", &sha("acme-original-secret"))
}

fn keyward(args: &[&str], file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("keys")
        .args(args)
        .arg("--file")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("run keyward")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The key file still holds the seed, and no edit was saved to history.
fn untouched(keys: &KeyDir) {
    assert_eq!(std::fs::read_to_string(&keys.path).unwrap(), seed());
    assert!(keyward::edit::history(&keys.path).unwrap().is_empty());
}

/// A secret printed by `new`/`rotate`: alone on stdout.
fn secret_of(out: &Output) -> String {
    let stdout = ok(out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds only the secret: {stdout:?}");
    assert!(keyward::secret::checksum_ok(lines[0]), "{stdout:?}");
    lines[0].to_owned()
}

struct Outcome {
    key_id: Option<String>,
    error: Option<String>,
    deprecation: bool,
}

async fn check(c: &mut AuthorizationClient<Channel>, secret: &str) -> Outcome {
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    headers: HashMap::from([("x-api-key".to_owned(), secret.to_owned())]),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    match c.check(req).await.unwrap().into_inner().http_response {
        Some(HttpResponse::OkResponse(ok)) => Outcome {
            key_id: ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-keyward-key-id")
                .map(|h| h.value.clone()),
            error: None,
            deprecation: ok
                .response_headers_to_add
                .iter()
                .any(|h| h.header.as_ref().is_some_and(|h| h.key == "deprecation")),
        },
        Some(HttpResponse::DeniedResponse(d)) => Outcome {
            key_id: None,
            error: Some(d.body),
            deprecation: false,
        },
        None => panic!("empty response"),
    }
}

/// Waits (at most a second, the contract) until `secret` gets `want`.
async fn within_a_second(
    c: &AuthorizationClient<Channel>,
    secret: &str,
    want: Result<&str, &str>,
) -> Outcome {
    eventually(Duration::from_secs(1), &format!("{want:?}"), || {
        let mut c = c.clone();
        async move {
            let o = check(&mut c, secret).await;
            let got = match (&o.key_id, &o.error) {
                (Some(id), _) => Ok(id.as_str()),
                (None, Some(e)) => Err(e.as_str()),
                _ => return None,
            };
            let matches = match (got, want) {
                (Ok(a), Ok(b)) => a == b,
                (Err(a), Err(b)) => a.contains(b),
                _ => false,
            };
            matches.then_some(o)
        }
    })
    .await
}

#[tokio::test]
async fn the_whole_lifecycle_against_a_running_server() {
    let keys = KeyDir::new(&seed());
    let file = keys.path.as_path();
    let server = Running::start(file).await;
    let c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();

    // new: a second client.
    let globex = secret_of(&keyward(
        &[
            "new", "--client", "globex", "--id", "globex-1", "--scopes", "read",
        ],
        file,
    ));
    within_a_second(&c, &globex, Ok("globex-1")).await;

    // rotate: acme gets a new key; the old one still works, and says so.
    let before_rotate = std::fs::read_to_string(file).unwrap();
    let out = keyward(
        &[
            "rotate", "--client", "acme", "--id", "acme-2", "--grace", "1d",
        ],
        file,
    );
    let acme2 = secret_of(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("deprecated acme-1"));
    within_a_second(&c, &acme2, Ok("acme-2")).await;
    let old = within_a_second(&c, "acme-original-secret", Ok("acme-1")).await;
    assert!(
        old.deprecation,
        "the old key carries Deprecation during the grace window"
    );

    // revoke: the old key is denied.
    ok(&keyward(&["revoke", "--id", "acme-1"], file));
    within_a_second(&c, "acme-original-secret", Err("revoked_key")).await;

    // rollback: back to before the revoke, exactly.
    let before_revoke_text = {
        let hist = keyward::edit::history(file).unwrap();
        std::fs::read_to_string(hist.last().unwrap()).unwrap()
    };
    let out = keyward(&["rollback"], file);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("warning: acme-1 works again (it was revoked or absent before the rollback)"),
        "a rollback that undoes a revocation says so: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(file).unwrap(), before_revoke_text);
    within_a_second(&c, "acme-original-secret", Ok("acme-1")).await;

    // rollback again: back to before the rotation, byte for byte.
    let out = keyward(&["rollback"], file);
    ok(&out);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(file).unwrap(), before_rotate);
    within_a_second(&c, &acme2, Err("unknown_key")).await;

    // Comments and layout survived every edit.
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.starts_with(&seed()), "{text}");

    // list: readable, no digests.
    let table = ok(&keyward(&["list"], file));
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("globex-1") && table.contains("acme-1"),
        "{table}"
    );
    assert!(
        !table.contains(&sha("acme-original-secret")),
        "no digests in list"
    );

    // check: OK here.
    assert!(ok(&keyward(&["check"], file)).contains("OK, 2 keys"));
    server.stop().await;
}

#[tokio::test]
async fn a_json_key_file_is_served_edited_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.json");
    let seed = format!(
        "{{\n  \"keys\": [\n    {{\n      \"id\": \"acme-1\",\n      \"client\": \"acme\",\n      \
         \"sha256\": \"{}\",\n      \"scopes\": [\"read\", \"trade\"]\n    }}\n  ]\n}}\n",
        sha("acme-original-secret")
    );
    std::fs::write(&file, &seed).unwrap();
    let server = Running::start(&file).await;
    let c = AuthorizationClient::connect(server.endpoint())
        .await
        .unwrap();
    within_a_second(&c, "acme-original-secret", Ok("acme-1")).await;

    let acme2 = secret_of(&keyward(
        &[
            "rotate", "--client", "acme", "--id", "acme-2", "--grace", "1d",
        ],
        &file,
    ));
    within_a_second(&c, &acme2, Ok("acme-2")).await;
    let old = within_a_second(&c, "acme-original-secret", Ok("acme-1")).await;
    assert!(old.deprecation);
    let text = std::fs::read_to_string(&file).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).expect("still JSON");
    assert_eq!(json["keys"][0]["state"], "deprecated", "{text}");
    assert!(
        json["keys"][0]["expires_at"].is_string(),
        "times are RFC 3339 strings: {text}"
    );
    assert!(
        text.starts_with("{\n  \"keys\": [\n    {\n      \"id\""),
        "two-space indentation kept: {text}"
    );

    ok(&keyward(&["revoke", "--id", "acme-1"], &file));
    within_a_second(&c, "acme-original-secret", Err("revoked_key")).await;
    let history = keyward::edit::history(&file).unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    // Revoking it again changes nothing, and keeps no history entry.
    ok(&keyward(&["revoke", "--id", "acme-1"], &file));
    assert_eq!(keyward::edit::history(&file).unwrap(), history);

    ok(&keyward(&["rollback"], &file));
    within_a_second(&c, "acme-original-secret", Ok("acme-1")).await;
    ok(&keyward(&["rollback"], &file));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        seed,
        "byte for byte"
    );
    within_a_second(&c, &acme2, Err("unknown_key")).await;

    let table = ok(&keyward(&["list"], &file));
    assert!(table.contains("acme-1"), "{table}");
    assert!(ok(&keyward(&["check"], &file)).contains("OK, 1 key (1 active,"));

    // A broken JSON file is reported at its line and column, and the
    // running ring keeps serving.
    std::fs::write(&file, seed.replace("\"scopes\"", "\"scope\"")).unwrap();
    let out = keyward(&["check"], &file);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{}:7:7: unknown field `scope` in a key",
            file.display()
        )),
        "{stdout}"
    );
    eventually(Duration::from_secs(2), "the reload failure", || {
        let failures = server.shared.reloads.last_error().is_some();
        async move { failures.then_some(()) }
    })
    .await;
    within_a_second(&c, "acme-original-secret", Ok("acme-1")).await;
    server.stop().await;
}

#[test]
fn check_reports_every_problem_with_positions() {
    let keys =
        KeyDir::new("[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"zz\"\nexpire_at = 1\n");
    let out = keyward(&["check"], &keys.path);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let p = keys.path.display();
    assert!(
        stdout.contains(&format!("{p}:4:10: `sha256` must be 64 hexadecimal digits")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{p}:5:1: unknown field `expire_at`")),
        "{stdout}"
    );
}

#[test]
fn hash_prints_the_digest_of_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"kw_example\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(ok(&out).trim(), sha("kw_example"));
}

#[test]
fn hash_refuses_nothing_and_mistyped_secrets() {
    use std::io::Write;
    let good = keyward::secret::generate().unwrap();
    let last = if good.ends_with('0') { "1" } else { "0" };
    let typo = format!("{}{last}", &good[..good.len() - 1]);
    for (input, expect) in [
        ("", "no secret"),
        ("\n", "no secret"),
        (&typo, "checksum fails"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["keys", "hash"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{input:?}");
        assert!(out.stdout.is_empty(), "{input:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{input:?}: {err}");
    }
}

/// `keys new` and `keys rotate` print the secret before the file is
/// written: when it cannot be printed (`> secret` on a full disk), nothing
/// is saved and the old keys keep their expiry.
#[test]
fn a_secret_that_cannot_be_handed_over_is_never_a_key() {
    let keys = KeyDir::new(&seed());
    for args in [
        &["new", "--client", "acme"][..],
        &["rotate", "--client", "acme"][..],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .arg("keys")
            .args(args)
            .arg("--file")
            .arg(&keys.path)
            .stdin(Stdio::null())
            .stdout(full)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot write the new secret") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        untouched(&keys);
    }
}

#[test]
fn durations_of_no_time_are_refused() {
    let keys = KeyDir::new(&seed());
    let out = keyward(&["new", "--client", "x", "--expires-in", "0s"], &keys.path);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shorter than a second"), "{err}");
    let out = keyward(
        &["new", "--client", "x", "--expires-in", "400ms"],
        &keys.path,
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    untouched(&keys);
}

#[test]
fn rotate_of_an_unknown_client_is_a_clear_error() {
    let keys = KeyDir::new(&seed());
    let out = keyward(&["rotate", "--client", "hooli"], &keys.path);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no secret printed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no keys for client \"hooli\""), "{err}");
    assert_eq!(
        std::fs::read_to_string(&keys.path).unwrap(),
        seed(),
        "file untouched"
    );
}

#[test]
fn an_invalid_result_leaves_the_file_untouched() {
    let keys = KeyDir::new(&seed());
    let out = keyward(
        &["new", "--client", "x", "--id", "not a valid id"],
        &keys.path,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "no secret printed for a key that was not saved"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not saved") && err.contains("invalid id"),
        "{err}"
    );
    untouched(&keys);
}

#[test]
fn concurrent_new_runs_lose_nothing() {
    let keys = KeyDir::new(&seed());
    let children: Vec<_> = (0..10)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_keyward"))
                .args(["keys", "new", "--client", &format!("client-{i}"), "--file"])
                .arg(&keys.path)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let secrets: Vec<String> = children
        .into_iter()
        .map(|c| secret_of(&c.wait_with_output().unwrap()))
        .collect();
    let (file, _) = keyward::keyfile::load(&keys.path, Default::default()).unwrap();
    assert_eq!(file.keys.len(), 11);
    for s in &secrets {
        let d = keyward::decide::digest(s);
        assert!(
            file.keys.iter().any(|k| k.digest == d),
            "a concurrent run's key was lost"
        );
    }
    assert!(
        std::fs::read_to_string(&keys.path)
            .unwrap()
            .starts_with(&seed())
    );
}
