//! Building the server from the environment, with embedded defaults, and serving it.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use cmz_core::{Error, Result};
use cmz_env::Lookup;

use crate::state::{AppState, HttpSettings};

/// The origins the legacy React frontend is served from in development (its Vite dev
/// server's port 3000, and the other ports the legacy backend allowed); it calls the API
/// on `http://localhost:8080` from there.
pub const LEGACY_FRONTEND_ORIGINS: &str =
    "http://localhost:3000,http://localhost:3001,http://localhost:3005";

/// The process environment with the demos' defaults, each used only when its variable is
/// unset: development users (`CMZ_DEV_USERS=embedded`) and CORS for the legacy frontend's
/// development origins (`CMZ_CORS_ORIGINS=`[`LEGACY_FRONTEND_ORIGINS`]). For examples and
/// local runs; production passes the plain environment to [`state_from_env`].
pub fn demo_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) => Some(value),
        Err(_) if name == "CMZ_DEV_USERS" => Some("embedded".into()),
        Err(_) if name == "CMZ_CORS_ORIGINS" => Some(LEGACY_FRONTEND_ORIGINS.into()),
        Err(_) => None,
    }
}

/// Builds the whole state from environment-style variables: the HTTP settings of
/// [`HttpSettings::from_lookup`] plus the services of [`cmz_env::services_from_env`]
/// (which chooses the backends, the model, the auth settings and the turn limit; this
/// crate's `dynamo`, `openai` and `dev` features turn on cmz-env's).
pub async fn state_from_env(lookup: &Lookup<'_>) -> Result<AppState> {
    let settings = HttpSettings::from_lookup(lookup)?;
    // Boxed, so that a caller's future does not inline every backend's setup: inlined,
    // it nests deep enough to overflow the compiler's layout query depth in `main`.
    let services = Box::pin(cmz_env::services_from_env(lookup)).await?;
    let every = cmz_env::number::<u64>(lookup, "CMZ_RETENTION_SWEEP_SECONDS")?
        .unwrap_or(600)
        .max(10);
    tokio::spawn(retention_sweeps(
        services.clone(),
        std::time::Duration::from_secs(every),
    ));
    Ok(AppState::new(services, settings))
}

/// Applies the families' own retention every `every` (see
/// `cmz_env::Services::apply_family_retention`); a failed sweep only logs.
async fn retention_sweeps(services: cmz_env::Services, every: std::time::Duration) {
    loop {
        tokio::time::sleep(every).await;
        match services.apply_family_retention(chrono::Utc::now()).await {
            Ok(report) if report.sessions > 0 => {
                tracing::info!(
                    families = report.families,
                    sessions = report.sessions,
                    messages = report.messages,
                    "family retention applied"
                );
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(
                    code = error.code().as_str(),
                    "family retention sweep failed"
                );
            }
        }
    }
}

/// Serves `app` on `bind` until Ctrl-C (or SIGTERM), finishing requests in flight.
/// A port already in use is a one-line error naming `CMZ_BIND`. Connections are timed
/// out and capped by [`ConnectionLimits`](crate::ConnectionLimits) from the process environment.
pub async fn serve(app: Router, bind: SocketAddr) -> Result<()> {
    let listener = listen(bind).map_err(|e| {
        let hint = format!(
            "cannot listen on {bind} ({}); set CMZ_BIND to another address (for example 127.0.0.1:8081)",
            e.kind()
        );
        Error::unavailable(hint, e)
    })?;
    let started = Instant::now();
    tracing::info!(%bind, "listening");
    Box::pin(crate::serve::serve_until(listener, app, shutdown_signal())).await?;
    tracing::info!(uptime_seconds = started.elapsed().as_secs(), "stopped");
    Ok(())
}

/// How many connections may wait to be accepted: a burst of clients (a class opening the
/// chat page at once) is queued rather than refused and retried a second later.
const LISTEN_BACKLOG: u32 = 2048;

fn listen(bind: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if bind.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(bind)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
