//! The operator-facing files in `deploy/` and `envoy/` are valid for the real tools.

use std::path::PathBuf;
use std::process::Command;

use crate::util::repo;

fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWARD_PROMTOOL") {
        return PathBuf::from(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("promtool");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "promtool is required for this test: run the suite with scripts/test.sh, which installs it"
    );
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    let text = run_ok(
        Command::new(promtool())
            .arg("check")
            .arg("rules")
            .arg(dir.join("keyward-alerts.yml")),
    );
    assert!(text.contains("SUCCESS"), "{text}");
    let text = run_ok(Command::new(promtool()).current_dir(&dir).args([
        "test",
        "rules",
        "keyward-alerts.test.yml",
    ]));
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_grafana_dashboard_is_valid_json() {
    let text =
        std::fs::read_to_string(repo().join("deploy/grafana/keyward-dashboard.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(v["panels"].as_array().is_some_and(|p| !p.is_empty()));
}
