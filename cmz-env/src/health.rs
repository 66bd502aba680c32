//! Checking the chat model: what `GET /chatgpt/health` reports, for any front end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmz_core::memory::OfflinePersonaModel;
use futures::future::BoxFuture;
use serde::Serialize;

/// The outcome of a model health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelHealth {
    /// `ok`, `degraded` or `unavailable`.
    pub status: String,
    /// The model name.
    pub model: String,
    /// True for the offline persona model (no LLM behind it).
    pub offline: bool,
    /// How long the check took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Why it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Checks the chat model.
pub type HealthCheck = Arc<dyn Fn() -> BoxFuture<'static, ModelHealth> + Send + Sync>;

/// The health check of the offline persona model: always ok, labelled offline.
pub fn offline_health() -> HealthCheck {
    Arc::new(|| {
        Box::pin(async {
            ModelHealth {
                status: "ok".into(),
                model: OfflinePersonaModel::NAME.into(),
                offline: true,
                latency_ms: Some(0),
                error: None,
            }
        })
    })
}

/// A health check answered from a cache for `ttl`: health routes are public, and each
/// uncached check is a request to the model provider.
pub fn cached(check: HealthCheck, ttl: Duration) -> HealthCheck {
    let last: Arc<tokio::sync::Mutex<Option<(Instant, ModelHealth)>>> = Arc::default();
    Arc::new(move || {
        let (check, last) = (check.clone(), last.clone());
        Box::pin(async move {
            // Holding the lock while checking makes concurrent callers share one check.
            let mut last = last.lock().await;
            if let Some((at, health)) = last.as_ref() {
                if at.elapsed() < ttl {
                    return health.clone();
                }
            }
            let health = check().await;
            *last = Some((Instant::now(), health.clone()));
            health
        })
    })
}
