//! The accept loop: connection limits and timeouts a server on the open internet needs.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use cmz_tower::ConnectionLimits;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
//! let limits = ConnectionLimits::from_lookup(&|name| std::env::var(name).ok())
//!     .expect("valid limits");
//! cmz_tower::serve_with(listener, app, limits, std::future::pending()).await;
//! # Ok(())
//! # }
//! ```

mod http1;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use cmz_core::{Error, Result};

use crate::client_ip::TrustedProxies;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

#[cfg(feature = "fuzzing")]
pub use http1::check_request;
pub use http1::{MAX_HEAD_BYTES, MAX_HEADERS};

/// Limits on connections, from the legacy-style variables of
/// [`from_lookup`](Self::from_lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a client has to send a request's headers, from their first byte
    /// (`CMZ_HEADER_TIMEOUT_MS`, default 10,000).
    pub header_read_timeout: Duration,
    /// How long a connection may sit with no request running and no bytes moving before
    /// it is closed (`CMZ_IDLE_TIMEOUT_MS`, default 60,000). A streaming reply keeps its
    /// connection busy with its own keep-alive comments.
    pub idle_timeout: Duration,
    /// Open connections in all (`CMZ_MAX_CONNECTIONS`, default 4,096); further ones are
    /// closed as soon as they are accepted.
    pub max_connections: usize,
    /// Open connections from one IP address (`CMZ_MAX_CONNECTIONS_PER_IP`, default 512:
    /// a school behind one NAT address opens several per browser).
    pub max_connections_per_ip: usize,
    /// The load balancers and proxies in front (`CMZ_TRUSTED_PROXIES`, none by default):
    /// every visitor arrives from their addresses, so they are not held to
    /// `max_connections_per_ip` (only to `max_connections`).
    pub trusted_proxies: TrustedProxies,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_ip: 512,
            trusted_proxies: TrustedProxies::none(),
        }
    }
}

fn positive(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
) -> Result<u64> {
    match lookup(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| {
                Error::validation(
                    name,
                    format!("{name} must be a positive whole number, got {value:?}"),
                )
            }),
    }
}

impl ConnectionLimits {
    /// Limits from environment-style variables (`CMZ_HEADER_TIMEOUT_MS`,
    /// `CMZ_IDLE_TIMEOUT_MS`, `CMZ_MAX_CONNECTIONS`, `CMZ_MAX_CONNECTIONS_PER_IP`,
    /// `CMZ_TRUSTED_PROXIES`); an unset variable keeps its default, a bad one is a
    /// `validation_error` naming it.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let defaults = Self::default();
        let millis = |name, default: Duration| {
            positive(lookup, name, default.as_millis() as u64).map(Duration::from_millis)
        };
        let count = |name, default: usize| {
            positive(lookup, name, default as u64).map(|v| usize::try_from(v).unwrap_or(usize::MAX))
        };
        Ok(Self {
            header_read_timeout: millis("CMZ_HEADER_TIMEOUT_MS", defaults.header_read_timeout)?,
            idle_timeout: millis("CMZ_IDLE_TIMEOUT_MS", defaults.idle_timeout)?,
            max_connections: count("CMZ_MAX_CONNECTIONS", defaults.max_connections)?,
            max_connections_per_ip: count(
                "CMZ_MAX_CONNECTIONS_PER_IP",
                defaults.max_connections_per_ip,
            )?,
            trusted_proxies: match lookup("CMZ_TRUSTED_PROXIES") {
                Some(list) => TrustedProxies::parse(&list)?,
                None => TrustedProxies::none(),
            },
        })
    }
}

/// Open connections per address.
#[derive(Debug, Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection's place in the per-address count.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` over HTTP/1.1 under `limits` until `shutdown` completes, then
/// finishes the requests in flight (connections idle between requests close at once) and
/// returns. Each request carries [`ConnectInfo<SocketAddr>`](axum::extract::ConnectInfo).
///
/// - a client that has not sent a whole request head within `header_read_timeout` is
///   disconnected (slow-header attacks);
/// - a connection with no request running and no bytes moving for `idle_timeout` is
///   closed;
/// - connections beyond `max_connections`, or beyond `max_connections_per_ip` from one
///   address, are closed as soon as they are accepted;
/// - request heads are limited to [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] (`431`); a body
///   framed two ways at once is refused (`400`). Bodies stream to the router, whose own
///   layers limit their size and time.
///
/// Each connection holds no buffer between requests, so an open connection (an idle
/// keep-alive one, or a Server-Sent Events stream between events) costs a few hundred
/// bytes besides its socket.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let (stop, stopping) = watch::channel(false);
    // Every connection's task holds a sender; when the last is gone, all have ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!("connection limit reached; closing a new connection");
            metrics::counter!("cmz_connections_refused_total", "reason" => "total").increment(1);
            continue;
        };
        // A trusted proxy carries every visitor's connections: only the total cap holds.
        let slot = if limits.trusted_proxies.trusts(remote.ip()) {
            None
        } else {
            let Some(slot) = per_address.take(remote.ip(), limits.max_connections_per_ip) else {
                tracing::debug!("per-address connection limit reached; closing a new connection");
                metrics::counter!("cmz_connections_refused_total", "reason" => "address")
                    .increment(1);
                continue;
            };
            Some(slot)
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(http1::serve_connection(
            stream,
            remote,
            app.clone(),
            limits.header_read_timeout,
            limits.idle_timeout,
            stopping.clone(),
            Held {
                _permit: permit,
                _slot: slot,
                _open: open.clone(),
            },
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    drop(open);
    let _ = all_closed.recv().await;
}

/// What an open connection holds until it ends: its places under the caps, and its part
/// in the count of open connections that shutdown waits on.
struct Held {
    _permit: OwnedSemaphorePermit,
    _slot: Option<AddressSlot>,
    _open: mpsc::Sender<()>,
}

/// `serve`'s loop over an already bound address, returning when the shutdown signal came.
pub(crate) async fn serve_until(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let limits = ConnectionLimits::from_lookup(&|name| std::env::var(name).ok())?;
    tracing::info!(
        header_read_timeout_ms = limits.header_read_timeout.as_millis() as u64,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        max_connections = limits.max_connections,
        max_connections_per_ip = limits.max_connections_per_ip,
        trusted_proxies = !limits.trusted_proxies.is_empty(),
        "connection limits"
    );
    serve_with(listener, app, limits, shutdown).await;
    Ok(())
}
