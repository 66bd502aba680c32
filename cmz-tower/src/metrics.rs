//! Counters and histograms through the `metrics` facade, and an optional Prometheus
//! `GET /metrics` (feature `prometheus`).
//!
//! Recorded: `cmz_turns_total{animal,outcome}`, `cmz_turn_duration_seconds`,
//! `cmz_model_latency_seconds`, `cmz_tokens_total{kind}` and
//! `cmz_http_errors_total{code}`. With no recorder installed they cost next to nothing.

use std::time::Duration;

use cmz_core::service::TurnReply;

/// Records a finished turn.
pub(crate) fn turn(reply: &TurnReply, elapsed: Duration) {
    let outcome = if reply.fallback {
        "fallback"
    } else if reply.interrupted {
        "interrupted"
    } else if reply.assistant_message.metadata.moderated {
        "moderated"
    } else {
        "ok"
    };
    metrics::counter!("cmz_turns_total", "outcome" => outcome).increment(1);
    metrics::histogram!("cmz_turn_duration_seconds").record(elapsed.as_secs_f64());
    let meta = &reply.assistant_message.metadata;
    if let Some(ms) = meta.latency_ms {
        metrics::histogram!("cmz_model_latency_seconds").record(ms as f64 / 1000.0);
    }
    if let Some(usage) = reply.usage {
        metrics::counter!("cmz_tokens_total", "kind" => "prompt")
            .increment(u64::from(usage.prompt_tokens));
        metrics::counter!("cmz_tokens_total", "kind" => "completion")
            .increment(u64::from(usage.completion_tokens));
    }
}

/// Records an error response.
pub(crate) fn error(code: &str) {
    metrics::counter!("cmz_http_errors_total", "code" => code.to_owned()).increment(1);
}

/// `GET /metrics` in Prometheus' text format. Installs the process-wide Prometheus
/// recorder the first time it is called (later calls share it).
#[cfg(feature = "prometheus")]
pub fn prometheus_router() -> cmz_core::Result<axum::Router> {
    use std::sync::OnceLock;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| {
            cmz_core::Error::internal("cannot install the Prometheus recorder").with_source(e)
        })?;
    Ok(axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        handle.render(),
                    )
                }
            }),
        )
        .layer(crate::SecurityHeadersLayer::new()))
}
