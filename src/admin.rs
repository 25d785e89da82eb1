//! The admin HTTP listener (loopback by default): health, readiness, the
//! serving ring, per-key usage and Prometheus metrics. It never exposes a
//! digest or a secret.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::service::Shared;

/// The admin routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ring", get(ring))
        .route("/metrics", get(metrics))
        .route("/keys", get(keys))
        .route("/lockouts", get(lockouts))
        .route("/lockouts/{source}", axum::routing::delete(lift_lockout))
        .with_state(shared)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once a ring is published. A server only exists after its first ring
/// loaded, and later failed reloads keep the last good ring serving, so this
/// stays 200 for the life of the process.
async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let ring = shared.ring.load();
    let generation = ring.generation();
    if generation == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no key ring loaded\n".into(),
        );
    }
    (
        StatusCode::OK,
        format!(
            "ready: generation {} with {} keys\n",
            generation,
            ring.len()
        ),
    )
}

/// The serving ring: generation, source digest, load time, key count, and
/// the last reload error (null once a later reload succeeds). The digest of
/// a large file is null for a moment after its ring is published, until the
/// hash finishes (see [`crate::ring::FileDigest`]).
async fn ring(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let ring = shared.ring.load_full();
    let last_error = shared
        .reloads
        .last_error()
        .map(|e| serde_json::json!({ "at": e.at.to_string(), "message": e.message }));
    Json(serde_json::json!({
        "generation": ring.generation(),
        "sha256": ring.file_sha256().map(hex::encode),
        "loaded_at": ring.loaded_at().to_string(),
        "keys": ring.len(),
        "reloads": {
            "success": shared.reloads.success.load(std::sync::atomic::Ordering::Relaxed),
            "failure": shared.reloads.failure.load(std::sync::atomic::Ordering::Relaxed),
        },
        "last_reload_error": last_error,
    }))
}

/// Prometheus' own scrapes ask for OpenMetrics; anyone else gets the
/// classic text format (see [`crate::metrics::wants_openmetrics`]).
async fn metrics(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    let openmetrics = crate::metrics::wants_openmetrics(
        headers
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let body = off_the_workers("metrics", move || {
        let body = crate::metrics::render(&shared).ok()?;
        Some(if openmetrics {
            (crate::metrics::CONTENT_TYPE, body)
        } else {
            (
                crate::metrics::TEXT_CONTENT_TYPE,
                crate::metrics::to_prometheus_text(&body),
            )
        })
    })
    .await;
    answer(body, "cannot encode metrics\n")
}

/// Reports rendered at once ([`off_the_workers`]). A report of a large
/// ring holds hundreds of megabytes while it is made; on the serving
/// workers there were at most as many as workers, and the blocking pool
/// would run hundreds.
static REPORTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Runs `report` on tokio's blocking threads, not on a worker that serves
/// checks, one report at a time: a report walks every key of the ring (a
/// million, for a large one), its body is as long, and it may wait for the
/// reloader to finish folding a replaced ring's counts (see
/// [`crate::ring::UsageView`]).
async fn off_the_workers<T: Send + 'static>(
    what: &'static str,
    report: impl FnOnce() -> Option<T> + Send + 'static,
) -> Option<T> {
    // The semaphore is never closed.
    let _turn = REPORTS.acquire().await.ok()?;
    match tokio::task::spawn_blocking(report).await {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(report = what, error = %e, "admin report failed");
            None
        }
    }
}

/// A report's body with its content type, or a 500 saying `failure`.
fn answer(body: Option<(&'static str, String)>, failure: &'static str) -> axum::response::Response {
    use axum::response::IntoResponse;
    match body {
        Some((content_type, body)) => {
            ([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response()
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, failure).into_response(),
    }
}

/// Every key in the serving ring with its usage (no digests).
async fn keys(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let body = off_the_workers("keys", move || {
        let body = serde_json::to_string(&keys_report(&shared)).ok()?;
        Some(("application/json", body))
    })
    .await;
    answer(body, "cannot report keys\n")
}

/// The body of `/keys`.
fn keys_report(shared: &Shared) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let view = shared.ring.usage_view();
    let ring = view.ring();
    let time = |t: Option<jiff::Timestamp>| t.map(|t| t.to_string());
    let keys: Vec<serde_json::Value> = ring
        .keys()
        .map(|k| {
            let last_used = view
                .last_used(k)
                .and_then(|s| jiff::Timestamp::from_second(i64::try_from(s).ok()?).ok())
                .map(|t| t.to_string());
            // Keys never denied have no denial counters yet: report zeros.
            let usage = k.usage_if_used();
            let mut denials = serde_json::Map::new();
            for reason in crate::decide::DenyReason::ALL {
                if let Some(i) = reason.key_index() {
                    let n = usage.map_or(0, |u| u.denied[i].load(Relaxed));
                    denials.insert(reason.code().into(), n.into());
                }
            }
            serde_json::json!({
                "id": k.id(),
                "client": k.client(),
                "state": k.state().as_str(),
                "scopes": k.scopes().iter().map(|s| &**s).collect::<Vec<_>>(),
                "not_before": time(k.not_before()),
                "expires_at": time(k.expires_at()),
                "deprecated_at": time(k.deprecated_at()),
                "description": k.description(),
                "requests": view.requests(k),
                "last_used": last_used,
                "denials": denials,
            })
        })
        .collect();
    serde_json::json!({
        "generation": ring.generation(),
        "counting_since": shared.counting_since.to_string(),
        "keys": keys,
    })
}

fn now_ns() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0)
}

/// Sources locked out right now.
async fn lockouts(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let now = now_ns();
    let cfg = shared.lockout.config();
    let list: Vec<serde_json::Value> = shared
        .lockout
        .active(now)
        .into_iter()
        .map(|l| {
            let until = jiff::Timestamp::from_nanosecond(i128::from(l.until_ns))
                .map(|t| t.to_string())
                .unwrap_or_default();
            serde_json::json!({
                "source": crate::lockout::label(l.source, cfg.ipv6_prefix),
                "until": until,
                // Never more than a lockout lasts (the clock may have
                // stepped back since it started).
                "remaining_seconds": (l.until_ns - now)
                    .div_ceil(1_000_000_000)
                    .min(cfg.duration.as_secs().max(1)),
            })
        })
        .collect();
    Json(serde_json::json!({
        "enabled": shared.lockout.enabled(),
        "threshold": cfg.threshold,
        "window_seconds": cfg.window.as_secs(),
        "duration_seconds": cfg.duration.as_secs(),
        "tracked_sources": shared.lockout.tracked(),
        "lockouts": list,
    }))
}

/// `DELETE /lockouts/{source}`: lifts a lockout. `source` is an address
/// (for an IPv6 network, any address in it), or the network as
/// `/lockouts` shows it with its `/` percent-encoded (`2001:db8::%2F64`).
async fn lift_lockout(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(source): axum::extract::Path<String>,
) -> (StatusCode, Json<serde_json::Value>) {
    let address = source.split_once('/').map_or(source.as_str(), |(a, _)| a);
    let Ok(ip) = address.parse::<std::net::IpAddr>() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": format!("{source:?} is not an IP address") })),
        );
    };
    match shared.lockout.lift(ip) {
        Some(lifted) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "lifted": crate::lockout::label(lifted, shared.lockout.config().ipv6_prefix)
            })),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("{ip} is not locked out") })),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_are_made_one_at_a_time() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        let reports: Vec<_> = (0..4)
            .map(|i| {
                tokio::spawn(off_the_workers("test", move || {
                    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
                    MOST.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    RUNNING.fetch_sub(1, Ordering::SeqCst);
                    Some(i)
                }))
            })
            .collect();
        for (i, report) in reports.into_iter().enumerate() {
            assert_eq!(report.await.unwrap(), Some(i));
        }
        assert_eq!(MOST.load(Ordering::SeqCst), 1);
    }
}
