//! The admin HTTP listener (loopback by default): health and readiness.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::service::Shared;

/// The admin routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
