//! The accept loop's limits over real loopback TCP: slow headers, idle connections, the
//! connection caps, streaming replies and graceful shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use cmz_tower::{ConnectionLimits, TrustedProxies, serve_with};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

fn app() -> Router {
    Router::new()
        .route(
            "/",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                format!("hello {}", peer.ip())
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                "done"
            }),
        )
        .route(
            "/stream",
            get(|| async {
                // Six chunks 150 ms apart: longer than the idle timeout in all.
                let chunks = futures::stream::unfold(0, |i| async move {
                    if i == 6 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Some((Ok::<_, std::io::Error>(format!("chunk {i}\n")), i + 1))
                });
                Body::from_stream(chunks)
            }),
        )
}

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(400),
        max_connections: 4,
        max_connections_per_ip: 3,
        trusted_proxies: TrustedProxies::none(),
        ..ConnectionLimits::default()
    }
}

struct Server {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    stopped: tokio::task::JoinHandle<()>,
}

async fn start(limits: ConnectionLimits) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = tokio::spawn(serve_with(listener, app(), limits, async move {
        let _ = stopped.await;
    }));
    Server {
        address,
        stop: Some(stop),
        stopped,
    }
}

/// Reads until the server closes the connection (or `limit` passes); returns what was
/// read and when the connection ended, `None` if it stayed open.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&seen).into(), None),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&seen).into(),
                    Some(started.elapsed()),
                );
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

async fn get_once(address: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .0
}

#[tokio::test]
async fn partial_and_trickled_headers_are_cut_off_at_the_header_timeout() {
    let server = start(limits()).await;
    let mut partial = TcpStream::connect(server.address).await.unwrap();
    partial
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut partial, Duration::from_secs(3)).await;
    let closed = closed.expect("a connection with partial headers is closed");
    assert!(closed < Duration::from_millis(1500), "{closed:?}");

    // A byte every 100 ms keeps bytes moving but never finishes the head.
    let mut trickle = TcpStream::connect(server.address).await.unwrap();
    let started = Instant::now();
    let mut closed_after = None;
    for byte in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        .iter()
        .cycle()
    {
        if trickle.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 256];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut probe)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let closed_after = closed_after.expect("a trickling header is cut off");
    assert!(
        closed_after < Duration::from_millis(1500),
        "{closed_after:?}"
    );

    // Normal requests still work, with the peer address available to handlers.
    assert!(
        get_once(server.address, "/")
            .await
            .contains("hello 127.0.0.1")
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_close_but_slow_and_streaming_replies_do_not() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (seen, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    let closed = closed.expect("an idle keep-alive connection is closed");
    assert!(closed < Duration::from_millis(1500), "{closed:?}");

    // A reply that takes longer than the idle timeout to start is not cut.
    assert!(get_once(server.address, "/slow").await.ends_with("done"));
    // Nor is a streamed reply that lasts longer than it in all.
    let streamed = get_once(server.address, "/stream").await;
    assert!(streamed.contains("chunk 5"), "{streamed}");
}

#[tokio::test]
async fn connections_beyond_the_caps_are_closed_at_once() {
    let server = start(limits()).await;
    // Three idle connections from 127.0.0.1: the per-address cap.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fourth = TcpStream::connect(server.address).await.unwrap();
    fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let (seen, closed) = read_until_closed(&mut fourth, Duration::from_secs(2)).await;
    assert!(seen.is_empty(), "{seen}");
    assert!(
        closed.expect("closed") < Duration::from_millis(300),
        "refused at once, not after a timeout"
    );
    // Once the held ones go (here: closed by the idle timeout), new ones are served.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(get_once(server.address, "/").await.contains("hello"));

    // The total cap, from addresses that are each under their own cap.
    let total = start(ConnectionLimits {
        max_connections: 2,
        max_connections_per_ip: 10,
        ..limits()
    })
    .await;
    let _a = TcpStream::connect(total.address).await.unwrap();
    let _b = TcpStream::connect(total.address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = TcpStream::connect(total.address).await.unwrap();
    let (_, closed) = read_until_closed(&mut third, Duration::from_secs(2)).await;
    assert!(closed.expect("closed") < Duration::from_millis(300));
}

#[tokio::test]
async fn a_trusted_proxy_is_held_to_the_total_cap_only() {
    // Behind a load balancer every visitor arrives from its address: the per-address cap
    // (2 here) would cap the whole service.
    let server = start(ConnectionLimits {
        max_connections: 5,
        max_connections_per_ip: 2,
        trusted_proxies: TrustedProxies::parse("127.0.0.1").unwrap(),
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(server.address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The fifth is still served, past the per-address cap.
    assert!(get_once(server.address, "/").await.contains("hello"));
    // The total cap still holds: five held, a sixth is closed unanswered.
    held.push(TcpStream::connect(server.address).await.unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut sixth = TcpStream::connect(server.address).await.unwrap();
    sixth
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let (seen, closed) = read_until_closed(&mut sixth, Duration::from_secs(2)).await;
    assert!(seen.is_empty(), "{seen}");
    assert!(closed.expect("closed") < Duration::from_millis(300));
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_then_returns() {
    let mut server = start(limits()).await;
    let slow = tokio::spawn(get_once(server.address, "/slow"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.stop.take().unwrap().send(()).unwrap();
    assert!(slow.await.unwrap().ends_with("done"));
    tokio::time::timeout(Duration::from_secs(3), server.stopped)
        .await
        .expect("the server stops")
        .unwrap();
    assert!(TcpStream::connect(server.address).await.is_err());
}

#[test]
fn limits_come_from_the_legacy_style_variables() {
    let defaults = ConnectionLimits::from_lookup(&|_| None).unwrap();
    assert_eq!(defaults, ConnectionLimits::default());
    assert_eq!(defaults.header_read_timeout, Duration::from_secs(10));
    let set = ConnectionLimits::from_lookup(&|name| match name {
        "CMZ_HEADER_TIMEOUT_MS" => Some("2500".into()),
        "CMZ_IDLE_TIMEOUT_MS" => Some("30000".into()),
        "CMZ_MAX_CONNECTIONS" => Some("100".into()),
        "CMZ_MAX_CONNECTIONS_PER_IP" => Some("20".into()),
        "CMZ_TRUSTED_PROXIES" => Some("10.0.0.0/8".into()),
        _ => None,
    })
    .unwrap();
    assert_eq!(
        set.trusted_proxies,
        TrustedProxies::parse("10.0.0.0/8").unwrap()
    );
    assert_eq!(set.header_read_timeout, Duration::from_millis(2500));
    assert_eq!(set.idle_timeout, Duration::from_secs(30));
    assert_eq!((set.max_connections, set.max_connections_per_ip), (100, 20));
    let bad = ConnectionLimits::from_lookup(&|name| {
        (name == "CMZ_MAX_CONNECTIONS").then(|| "lots".into())
    })
    .unwrap_err();
    assert_eq!(bad.code(), "validation_error");
    assert!(bad.to_string().contains("CMZ_MAX_CONNECTIONS"));
}
