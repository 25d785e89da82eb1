//! The admin HTTP listener (loopback by default): health, readiness and the
//! serving ring.

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
    let source = ring.source();
    if source.generation == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no key ring loaded\n".into(),
        );
    }
    (
        StatusCode::OK,
        format!(
            "ready: generation {} with {} keys\n",
            source.generation,
            ring.len()
        ),
    )
}

/// The serving ring: generation, source digest, load time, key count, and
/// the last reload error (null once a later reload succeeds).
async fn ring(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let ring = shared.ring.load_full();
    let source = ring.source();
    let last_error = shared
        .reloads
        .last_error()
        .map(|e| serde_json::json!({ "at": e.at.to_string(), "message": e.message }));
    Json(serde_json::json!({
        "generation": source.generation,
        "sha256": hex::encode(source.sha256),
        "loaded_at": source.loaded_at.to_string(),
        "keys": ring.len(),
        "reloads": {
            "success": shared.reloads.success.load(std::sync::atomic::Ordering::Relaxed),
            "failure": shared.reloads.failure.load(std::sync::atomic::Ordering::Relaxed),
        },
        "last_reload_error": last_error,
    }))
}
