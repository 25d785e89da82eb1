//! Prometheus exposition. Nothing here runs on the verify path: the hot path
//! bumps relaxed atomics ([`crate::stats`], the ring's per-key counts,
//! [`crate::ring::KeyUsage`]) and this
//! collector reads them when `/metrics` is scraped.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::decide::DenyReason;
use crate::service::Shared;

/// Reads the shared state at scrape time.
#[derive(Debug)]
struct SharedCollector(Arc<Shared>);

/// Renders every metric in the OpenMetrics text format (which Prometheus
/// scrapes natively; `# HELP` and `# TYPE` lines included).
pub fn render(shared: &Arc<Shared>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SharedCollector(Arc::clone(shared))));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`to_prometheus_text`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper that sent `accept` takes OpenMetrics (Prometheus asks
/// for it first). Any other client, `curl` or an agent that reads only the
/// classic format, gets the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            parts
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
    })
}

/// `openmetrics`, as [`render`] writes it, in the Prometheus text format
/// 0.0.4: a counter's `# HELP` and `# TYPE` name it with its `_total`
/// suffix, as its samples do; `# HELP` text escapes only backslashes and
/// line feeds; and there is no `# EOF`. Samples are the same in both.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        let Some((prefix, rest)) = meta else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
        out.push_str(prefix);
        out.push_str(name);
        if counters.contains(name) {
            out.push_str("_total");
        }
        out.push(' ');
        if prefix == "# HELP " {
            // OpenMetrics escapes `"` in help text too; 0.0.4 does not.
            let mut chars = text.chars();
            while let Some(c) = chars.next() {
                match (c, chars.clone().next()) {
                    ('\\', Some('"')) => {}
                    ('\\', Some(next)) => {
                        out.push('\\');
                        out.push(next);
                        chars.next();
                    }
                    _ => out.push(c),
                }
            }
        } else {
            out.push_str(text);
        }
        out.push('\n');
    }
    out
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for SharedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let stats = &shared.stats;

        // Names of counters are given without `_total`: the encoder appends it.
        let mut checks = encoder.encode_descriptor(
            "keyward_checks",
            "Checks decided, by result (allowed, denied) and reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("active_key", stats.allowed()),
            ("deprecated_key", stats.allowed_deprecated()),
        ] {
            ConstCounter::new(v)
                .encode(checks.encode_family(&[("result", "allowed"), ("reason", reason)])?)?;
        }
        for reason in DenyReason::ALL {
            ConstCounter::new(stats.denied(reason)).encode(
                checks.encode_family(&[("result", "denied"), ("reason", reason.code())])?,
            )?;
        }

        let (sum, count, buckets) = stats.latency_snapshot();
        encoder
            .encode_descriptor(
                "keyward_check_duration_seconds",
                &format!(
                    "Time to decide a check, measured inside the service on one check in {} \
                     of each serving thread.",
                    crate::stats::TIMED_ONE_IN
                ),
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;

        let view = shared.ring.usage_view();
        let ring = view.ring();
        // Each key's id, joined (see `KeyId`).
        let mut id_buf = String::new();
        {
            let mut requests = encoder.encode_descriptor(
                "keyward_key_requests",
                "Allowed requests per key (since the key was first loaded by this process).",
                None,
                MetricType::Counter,
            )?;
            for k in ring.keys() {
                let labels = [
                    ("key_id", Label(k.id().joined(&mut id_buf))),
                    ("client", Label(k.client())),
                ];
                ConstCounter::new(view.requests(k)).encode(requests.encode_family(&labels)?)?;
            }
        }
        {
            let mut last = encoder.encode_descriptor(
                "keyward_key_last_used_timestamp_seconds",
                "Unix time of the key's last allowed request (absent if never used).",
                None,
                MetricType::Gauge,
            )?;
            for k in ring.keys() {
                if let Some(t) = view.last_used(k) {
                    let labels = [
                        ("key_id", Label(k.id().joined(&mut id_buf))),
                        ("client", Label(k.client())),
                    ];
                    ConstGauge::new(i64::try_from(t).unwrap_or(i64::MAX))
                        .encode(last.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut denials = encoder.encode_descriptor(
                "keyward_key_denials",
                "Denied requests that presented a known key, by reason.",
                None,
                MetricType::Counter,
            )?;
            for k in ring.keys() {
                for reason in DenyReason::ALL {
                    if let Some(i) = reason.key_index() {
                        let v = k
                            .usage_if_used()
                            .map_or(0, |u| u.denied[i].load(Ordering::Relaxed));
                        if v > 0 {
                            let labels = [
                                ("key_id", Label(k.id().joined(&mut id_buf))),
                                ("client", Label(k.client())),
                                ("reason", Label(reason.code())),
                            ];
                            ConstCounter::new(v).encode(denials.encode_family(&labels)?)?;
                        }
                    }
                }
            }
        }
        {
            let mut info = encoder.encode_descriptor(
                "keyward_key_info",
                "One series per key in the serving ring, with its state.",
                None,
                MetricType::Gauge,
            )?;
            for k in ring.keys() {
                let labels = [
                    ("key_id", Label(k.id().joined(&mut id_buf))),
                    ("client", Label(k.client())),
                    ("state", Label(k.state().as_str())),
                ];
                ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
            }
        }
        {
            let mut expires = encoder.encode_descriptor(
                "keyward_key_expires_timestamp_seconds",
                "Unix time at which the key expires (keys with an expiry only).",
                None,
                MetricType::Gauge,
            )?;
            for k in ring.keys() {
                if let Some(e) = k.expires_at() {
                    let labels = [
                        ("key_id", Label(k.id().joined(&mut id_buf))),
                        ("client", Label(k.client())),
                    ];
                    ConstGauge::new(e.as_second()).encode(expires.encode_family(&labels)?)?;
                }
            }
        }

        {
            let mut limited = encoder.encode_descriptor(
                "keyward_rate_limited",
                "Requests denied because the key was over its rate limit.",
                None,
                MetricType::Counter,
            )?;
            let i = DenyReason::RateLimited.key_index().unwrap_or_default();
            for k in ring.keys().filter(|k| k.rate_limit().is_some()) {
                let labels = [
                    ("key_id", Label(k.id().joined(&mut id_buf))),
                    ("client", Label(k.client())),
                ];
                ConstCounter::new(
                    k.usage_if_used()
                        .map_or(0, |u| u.denied[i].load(Ordering::Relaxed)),
                )
                .encode(limited.encode_family(&labels)?)?;
            }
        }
        ConstCounter::new(shared.lockout.total()).encode(encoder.encode_descriptor(
            "keyward_lockouts",
            "Sources locked out after repeated failed checks.",
            None,
            MetricType::Counter,
        )?)?;
        let now_ns = u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0);
        gauge(
            &mut encoder,
            "keyward_lockouts_active",
            "Sources locked out right now.",
            shared.lockout.active(now_ns).len() as i64,
        )?;

        gauge(
            &mut encoder,
            "keyward_ring_keys",
            "Keys in the serving ring.",
            ring.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "keyward_ring_generation",
            "Generation of the serving ring (1 for the ring loaded at startup).",
            i64::try_from(ring.generation()).unwrap_or(i64::MAX),
        )?;
        {
            let mut info = encoder.encode_descriptor(
                "keyward_ring_info",
                "SHA-256 of the key file the serving ring was built from (no sample \
                 for the moment a large file's digest is still being computed).",
                None,
                MetricType::Gauge,
            )?;
            if let Some(sha) = ring.file_sha256() {
                let sha = hex::encode(sha);
                ConstGauge::new(1i64).encode(info.encode_family(&[("sha256", sha.as_str())])?)?;
            }
        }
        gauge(
            &mut encoder,
            "keyward_ring_loaded_timestamp_seconds",
            "Unix time the serving ring was built.",
            ring.loaded_at().as_second(),
        )?;

        let reloads = &shared.reloads;
        let mut family = encoder.encode_descriptor(
            "keyward_reloads",
            "Reload attempts after startup, by result (success published a ring; failure kept the previous one).",
            None,
            MetricType::Counter,
        )?;
        for (result, v) in [
            ("success", reloads.success.load(Ordering::Relaxed)),
            ("failure", reloads.failure.load(Ordering::Relaxed)),
        ] {
            ConstCounter::new(v).encode(family.encode_family(&[("result", result)])?)?;
        }
        gauge(
            &mut encoder,
            "keyward_reload_failing",
            "1 while the key file on disk cannot be loaded (the previous ring keeps serving).",
            i64::from(reloads.last_error().is_some()),
        )?;
        Ok(())
    }
}

/// A label value with the escapes the text format requires (backslash,
/// double quote, line feed), which the client library leaves to its
/// caller: a client name is free text, and one unescaped `"` would make
/// Prometheus refuse the whole scrape.
#[derive(Debug, Clone, Copy)]
struct Label<'a>(&'a str);

impl EncodeLabelValue for Label<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let mut rest = self.0;
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{FileDigest, KeyRing, UsageRegistry};

    #[test]
    fn openmetrics_is_what_prometheus_asks_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
                          application/openmetrics-text;version=0.0.1;q=0.4,\
                          text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("Application/OpenMetrics-Text")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0, text/plain"
        )));
    }

    #[test]
    fn the_classic_text_format_names_counters_with_their_suffix() {
        let (shared, _) = one_key("\"acme\"");
        let om = render(&shared).unwrap();
        let text = to_prometheus_text(&om);
        assert!(om.contains("# TYPE keyward_checks counter\n"), "{om}");
        assert!(
            text.contains("# TYPE keyward_checks_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP keyward_checks_total Checks decided"),
            "{text}"
        );
        assert!(text.contains("# TYPE keyward_ring_keys gauge\n"), "{text}");
        assert!(text.contains("# TYPE keyward_check_duration_seconds histogram\n"));
        assert!(om.ends_with("# EOF\n") && !text.contains("# EOF"));
        // Every sample belongs to the family a `# TYPE` line names.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(
                families.iter().any(|f| name == *f
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f))),
                "{name} has no # TYPE line"
            );
        }
        // The samples themselves are the same.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&om), samples(&text));
        // Help text: 0.0.4 escapes only backslashes and line feeds.
        assert_eq!(
            to_prometheus_text(
                "# HELP a_b say \\\"hi\\\" \\\\ \\n\n# TYPE a_b gauge\na_b 1\n# EOF\n"
            ),
            "# HELP a_b say \"hi\" \\\\ \\n\n# TYPE a_b gauge\na_b 1\n"
        );
    }

    /// Shared state serving one key of `client` (a TOML string), with the
    /// ring's file digest still to come.
    fn one_key(client: &str) -> (Arc<Shared>, FileDigest) {
        let text = format!(
            "[[keys]]\nid = \"a\"\nclient = {client}\nsha256 = \"{}\"\n",
            hex::encode(crate::decide::digest("s"))
        );
        let file = crate::keyfile::parse_str(&text, Default::default()).unwrap();
        let digest = FileDigest::pending();
        let usage = UsageRegistry::default();
        let ring = KeyRing::build_with_digest(
            &file,
            1,
            jiff::Timestamp::now(),
            digest.clone(),
            &usage,
            None,
            crate::keyfile::Threads::all(),
        );
        (
            Arc::new(Shared::new(ring, usage, Default::default())),
            digest,
        )
    }

    #[test]
    fn free_text_label_values_are_escaped() {
        let (shared, _) = one_key(r#"'acme "eu" \ desk'"#);
        assert_eq!(
            shared.ring.load().keys().next().unwrap().client(),
            r#"acme "eu" \ desk"#
        );
        let body = render(&shared).unwrap();
        assert!(
            body.contains(
                r#"keyward_key_requests_total{key_id="a",client="acme \"eu\" \\ desk"} 0"#
            ),
            "{body}"
        );
    }

    #[test]
    fn ring_info_appears_once_the_digest_is_known() {
        let (shared, digest) = one_key("\"c\"");
        let body = render(&shared).unwrap();
        assert!(body.contains("# TYPE keyward_ring_info gauge"), "{body}");
        assert!(!body.contains("keyward_ring_info{"), "{body}");
        assert!(body.contains("keyward_ring_generation 1"), "{body}");
        digest.set([0xab; 32]);
        let body = render(&shared).unwrap();
        let want = format!("keyward_ring_info{{sha256=\"{}\"}} 1", "ab".repeat(32));
        assert!(body.contains(&want), "{body}");
    }
}
