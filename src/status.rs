//! `keyward status`: per-client, per-key usage from a running server's admin
//! API, with a verdict on which old keys are safe to retire.

use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

/// One key as `/keys` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyReport {
    /// Key id.
    pub id: String,
    /// Client.
    pub client: String,
    /// active | deprecated | revoked.
    pub state: String,
    /// Allowed requests.
    pub requests: u64,
    /// Last allowed request (RFC 3339), if any.
    pub last_used: Option<String>,
    /// Start of validity (RFC 3339), if any.
    #[serde(default)]
    pub not_before: Option<String>,
    /// Expiry (RFC 3339), if any.
    pub expires_at: Option<String>,
}

/// The `/keys` document.
#[derive(Debug, Clone, Deserialize)]
pub struct KeysReport {
    /// Serving generation.
    pub generation: u64,
    /// Since when the server counts use (RFC 3339): its start. Absent
    /// from servers that predate it.
    #[serde(default)]
    pub counting_since: Option<String>,
    /// Keys in file order.
    pub keys: Vec<KeyReport>,
}

/// Fetches `/keys` from the admin listener at `admin` (`host:port` or a URL).
pub async fn fetch(admin: &str) -> anyhow::Result<KeysReport> {
    let base = if admin.contains("://") {
        admin.trim_end_matches('/').to_owned()
    } else {
        format!("http://{admin}")
    };
    let url = format!("{base}/keys");
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the admin API at {url}: {e}"))?;
    if !resp.status().is_success() {
        anyhow::bail!("{url} answered {}", resp.status());
    }
    Ok(resp.json().await?)
}

fn parse(t: Option<&str>) -> Option<Timestamp> {
    t.and_then(|s| s.parse().ok())
}

fn ago(now: Timestamp, t: Option<Timestamp>) -> String {
    let Some(t) = t else { return "never".into() };
    let secs = (now - t).get_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// The verdict for one key.
pub fn verdict(report: &KeysReport, index: usize, now: Timestamp, idle: Duration) -> String {
    let k = &report.keys[index];
    if k.state == "revoked" {
        return "revoked".into();
    }
    if parse(k.expires_at.as_deref()).is_some_and(|e| now >= e) {
        return "expired".into();
    }
    // Superseded: the client has an active key, added after this one,
    // that works now (not one issued ahead, nor one expired).
    let superseded = report.keys[index + 1..].iter().any(|o| {
        o.client == k.client
            && o.state == "active"
            && parse(o.not_before.as_deref()).is_none_or(|t| t <= now)
            && parse(o.expires_at.as_deref()).is_none_or(|t| now < t)
    });
    if k.state != "deprecated" && !superseded {
        return "in service".into();
    }
    let last = parse(k.last_used.as_deref());
    let idle_for = last.map(|t| now.duration_since(t));
    let wanted = jiff::SignedDuration::try_from(idle).unwrap_or(jiff::SignedDuration::MAX);
    if let Some(d) = idle_for
        && d < wanted
    {
        return format!("still in use ({})", ago(now, last));
    }
    // Unused since the server started counting: that says nothing until
    // it has counted for the whole idle time (a restart forgets).
    let counted = parse(report.counting_since.as_deref()).map(|t| now.duration_since(t));
    if let Some(counted) = counted
        && counted < wanted
    {
        let counted = Duration::from_secs(counted.as_secs().max(0).unsigned_abs());
        return format!(
            "not yet: unused in the {} counted since the server started",
            humanize(counted)
        );
    }
    "SAFE TO RETIRE".into()
}

/// Renders the status table, grouped by client.
pub fn render(report: &KeysReport, now: Timestamp, idle: Duration) -> String {
    let mut order: Vec<usize> = (0..report.keys.len()).collect();
    order.sort_by(|&a, &b| {
        report.keys[a]
            .client
            .cmp(&report.keys[b].client)
            .then(a.cmp(&b))
    });
    let mut rows = vec![[
        "CLIENT".to_owned(),
        "KEY".to_owned(),
        "STATE".to_owned(),
        "REQUESTS".to_owned(),
        "LAST USED".to_owned(),
        "VERDICT".to_owned(),
    ]];
    for i in order {
        let k = &report.keys[i];
        rows.push([
            k.client.clone(),
            k.id.clone(),
            k.state.clone(),
            k.requests.to_string(),
            ago(now, parse(k.last_used.as_deref())),
            verdict(report, i, now, idle),
        ]);
    }
    let mut out = format!(
        "generation {}; a key is safe to retire when it is deprecated or superseded and unused for {}\n\n",
        report.generation,
        humanize(idle)
    );
    out.push_str(&crate::keys::render_table(&rows));
    out
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, client: &str, state: &str, last_used: Option<&str>) -> KeyReport {
        KeyReport {
            id: id.into(),
            client: client.into(),
            state: state.into(),
            requests: 7,
            last_used: last_used.map(Into::into),
            not_before: None,
            expires_at: None,
        }
    }

    #[test]
    fn verdicts() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let idle = Duration::from_secs(15 * 60);
        let mut expired = key("hooli-1", "hooli", "active", None);
        expired.expires_at = Some("2026-11-01T00:00:00Z".into());
        let report = KeysReport {
            generation: 3,
            counting_since: Some("2026-11-27T09:00:00Z".into()),
            keys: vec![
                key("acme-1", "acme", "deprecated", Some("2026-11-27T11:59:00Z")),
                key("acme-0", "acme", "deprecated", Some("2026-11-27T10:00:00Z")),
                key("globex-1", "globex", "active", None),
                key("acme-2", "acme", "active", Some("2026-11-27T11:59:59Z")),
                key("globex-2", "globex", "active", Some("2026-11-27T11:00:00Z")),
                key("initech-1", "initech", "revoked", None),
                expired,
            ],
        };
        let v = |i| verdict(&report, i, now, idle);
        assert_eq!(v(0), "still in use (1m ago)");
        assert_eq!(v(1), "SAFE TO RETIRE");
        assert_eq!(
            v(2),
            "SAFE TO RETIRE",
            "superseded by globex-2 and never used"
        );
        assert_eq!(v(3), "in service");
        assert_eq!(v(4), "in service");
        assert_eq!(v(5), "revoked");
        assert_eq!(v(6), "expired");
        let table = render(&report, now, idle);
        assert!(table.contains("unused for 15m"), "{table}");
        let acme_rows: Vec<&str> = table.lines().filter(|l| l.starts_with("acme")).collect();
        assert_eq!(acme_rows.len(), 3);
        assert!(
            acme_rows[0].contains("acme-1"),
            "file order within a client: {table}"
        );
    }

    #[test]
    fn only_a_key_that_works_now_supersedes_and_a_restart_is_not_idleness() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let idle = Duration::from_secs(15 * 60);
        let mut ahead = key("acme-2", "acme", "active", None);
        ahead.not_before = Some("2026-12-01T00:00:00Z".into());
        let mut lapsed = key("globex-2", "globex", "active", None);
        lapsed.expires_at = Some("2026-11-27T11:00:00Z".into());
        let mut report = KeysReport {
            generation: 1,
            counting_since: Some("2026-11-27T11:58:00Z".into()),
            keys: vec![
                key("acme-1", "acme", "active", None),
                ahead,
                key("globex-1", "globex", "active", None),
                lapsed,
                key("initech-1", "initech", "deprecated", None),
            ],
        };
        let v = |r: &KeysReport, i| verdict(r, i, now, idle);
        assert_eq!(v(&report, 0), "in service", "its successor starts later");
        assert_eq!(v(&report, 2), "in service", "its successor has expired");
        assert_eq!(
            v(&report, 4),
            "not yet: unused in the 2m counted since the server started"
        );
        report.counting_since = Some("2026-11-27T11:45:00Z".into());
        assert_eq!(v(&report, 4), "SAFE TO RETIRE");
        // A server that does not say since when it counts: as before.
        report.counting_since = None;
        assert_eq!(v(&report, 4), "SAFE TO RETIRE");
    }
}
