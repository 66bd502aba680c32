//! The accept loop's limits over real loopback TCP: slow headers, idle connections, the
//! connection caps, streaming replies and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
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

/// The idle timer outlives one wait: when it fires during a later wait (one that began
/// after it was set), the connection lives on, and closes one idle timeout after its last
/// reply.
#[tokio::test]
async fn the_idle_timeout_counts_from_the_last_reply() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let mut buffer = Vec::new();
    // Pauses of 300 ms under a 400 ms timeout: 1.2 s in all, three timeouts' worth.
    for round in 0..4 {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut stream, &mut buffer).await;
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        assert_eq!(body, b"hello 127.0.0.1");
    }
    let (rest, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(rest.is_empty(), "{rest}");
    let closed = closed.expect("closed once idle");
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_millis(1500),
        "{closed:?}"
    );
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

// ----------------------------------------------------------------------------------------
// The HTTP/1.1 connection itself: framing, keep-alive, refusals and cancellation.

/// Set when dropped: shows that a handler or a reply stream was let go.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn protocol_app(handler_dropped: Arc<AtomicBool>, stream_dropped: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { "hello" }).post(|body: String| async move { format!("got {body}") }),
        )
        .route("/nothing", get(|| async { StatusCode::NO_CONTENT }))
        .route("/big", get(|| async { "x".repeat(100_000) }))
        .route(
            "/big-stream",
            get(|| async {
                let pieces = futures::stream::iter(
                    (0..3).map(|i| Ok::<_, std::io::Error>(format!("{i}").repeat(40_000))),
                );
                Body::from_stream(pieces)
            }),
        )
        .route(
            "/wait",
            get(move || {
                let flag = DropFlag(handler_dropped.clone());
                async move {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(flag);
                    "late"
                }
            }),
        )
        .route(
            "/drip",
            get(move || {
                let flag = DropFlag(stream_dropped.clone());
                async move {
                    let drops = futures::stream::unfold((0, flag), |(i, flag)| async move {
                        if i == 10 {
                            return None;
                        }
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Some((
                            Ok::<_, std::io::Error>(format!("drop {i}\n")),
                            (i + 1, flag),
                        ))
                    });
                    Body::from_stream(drops)
                }
            }),
        )
}

async fn protocol_server() -> (SocketAddr, Arc<AtomicBool>, Arc<AtomicBool>) {
    let (handler, stream) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(serve_with(
        listener,
        protocol_app(handler.clone(), stream.clone()),
        ConnectionLimits::default(),
        std::future::pending(),
    ));
    (address, handler, stream)
}

/// Reads one response (head and body, framed by its own headers) off `stream`; `buffer`
/// keeps what was read past it.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> (String, Vec<u8>) {
    read_reply(stream, buffer, false).await
}

/// [`read_response`], for a `HEAD` request (`head`: a length but no body).
async fn read_reply(stream: &mut TcpStream, buffer: &mut Vec<u8>, head: bool) -> (String, Vec<u8>) {
    async fn more(stream: &mut TcpStream, buffer: &mut Vec<u8>) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(buffer)
        );
        buffer.extend_from_slice(&chunk[..n]);
    }
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        more(stream, buffer).await;
    };
    let head_only = head;
    let head = String::from_utf8(buffer.drain(..head_end).collect()).unwrap();
    let lower = head.to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let line_end = loop {
                if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                more(stream, buffer).await;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buffer[..line_end]).unwrap(), 16)
                .unwrap();
            buffer.drain(..line_end + 2);
            while buffer.len() < size + 2 {
                more(stream, buffer).await;
            }
            body.extend(buffer.drain(..size));
            assert_eq!(buffer.drain(..2).collect::<Vec<_>>(), b"\r\n");
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        if !head_only && !head.starts_with("HTTP/1.1 1") && status != 204 && status != 304 {
            while buffer.len() < length {
                more(stream, buffer).await;
            }
            body.extend(buffer.drain(..length));
        }
    }
    (head, body)
}

#[tokio::test]
async fn keep_alive_pipelining_and_connection_close_are_honoured() {
    let (address, _, _) = protocol_server().await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut buffer = Vec::new();
    // Two requests one after the other, then two written at once: answered in order.
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut stream, &mut buffer).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
        assert_eq!(body, b"hello");
    }
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nonePOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ntwo")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, &mut buffer).await.1, b"got one");
    assert_eq!(read_response(&mut stream, &mut buffer).await.1, b"got two");
    // `Connection: close` is answered, then the connection ends.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream, &mut buffer).await;
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(body, b"hello");
    let (rest, closed) = read_until_closed(&mut stream, Duration::from_secs(2)).await;
    assert!(rest.is_empty() && closed.is_some(), "{rest:?}");

    // HTTP/1.0: one request; a streamed body runs until the connection closes.
    let mut old = TcpStream::connect(address).await.unwrap();
    old.write_all(b"GET /drip HTTP/1.0\r\n\r\n").await.unwrap();
    let (text, closed) = read_until_closed(&mut old, Duration::from_secs(5)).await;
    assert!(closed.is_some());
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("connection: close") && !lower.contains("chunked"),
        "{text}"
    );
    assert!(
        text.ends_with("drop 0\n") || text.contains("\r\n\r\ndrop 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn bodies_arrive_chunked_split_or_after_100_continue() {
    let (address, _, _) = protocol_server().await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut buffer = Vec::new();
    // Chunked, with a chunk extension and a trailer field, in pieces.
    for piece in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;note=1\r\nhel"[..],
        b"lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n",
        b"\r\n",
    ] {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        read_response(&mut stream, &mut buffer).await.1,
        b"got hello world"
    );
    // A Content-Length body split over writes, on the same connection.
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(b"cdef").await.unwrap();
    assert_eq!(
        read_response(&mut stream, &mut buffer).await.1,
        b"got abcdef"
    );
    // `Expect: 100-continue`: the interim answer comes before the body is sent.
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let (interim, _) = read_response(&mut stream, &mut buffer).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim}"
    );
    stream.write_all(b"body").await.unwrap();
    assert_eq!(read_response(&mut stream, &mut buffer).await.1, b"got body");
}

#[tokio::test]
async fn ambiguous_malformed_and_oversized_requests_are_refused() {
    let (address, _, _) = protocol_server().await;
    let refused = |request: Vec<u8>| async move {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(3)).await;
        assert!(
            closed.is_some(),
            "the connection is closed after a refusal: {text}"
        );
        text
    };
    // A body framed two ways (request smuggling), a bad header, a bad version.
    for request in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/3.0\r\n\r\n",
    ] {
        let text = refused(request.to_vec()).await;
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("connection: close"), "{text}");
        assert!(lower.contains("\r\nx-content-type-options: nosniff\r\n"), "{text}");
        assert!(
            lower.contains(&format!(
                "\r\ncontent-security-policy: {}\r\n",
                cmz_tower::API_CONTENT_SECURITY_POLICY
            )),
            "{text}"
        );
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let error: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(error["code"], "validation_error", "{text}");
    }
    // A head too large for the limit.
    let mut large = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    large.extend(format!("X-Big: {}\r\n\r\n", "y".repeat(cmz_tower::MAX_HEAD_BYTES)).as_bytes());
    let text = refused(large).await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    // A malformed chunk reaches the app as a body error; the connection does not go on.
    let text =
        refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec())
            .await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
}

#[tokio::test]
async fn head_204_and_large_replies_are_framed_right() {
    let (address, _, _) = protocol_server().await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut buffer = Vec::new();
    stream.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /big-stream HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // HEAD: the head, with the length a GET would have, and no body (what follows on the
    // wire is the next response).
    let (head, _) = read_reply(&mut stream, &mut buffer, true).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 5\r\n"),
        "{head}"
    );
    assert!(
        buffer.is_empty() || buffer.starts_with(b"HTTP/1.1 204"),
        "{:?}",
        String::from_utf8_lossy(&buffer)
    );
    let (head, body) = read_response(&mut stream, &mut buffer).await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("content-length") && !lower.contains("transfer-encoding"),
        "{head}"
    );
    assert!(body.is_empty());
    let (head, body) = read_response(&mut stream, &mut buffer).await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 100000"),
        "{head}"
    );
    assert_eq!(body, "x".repeat(100_000).as_bytes());
    let (head, body) = read_response(&mut stream, &mut buffer).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let expected: String = (0..3).map(|i| format!("{i}").repeat(40_000)).collect();
    assert_eq!(body, expected.as_bytes());
    assert_eq!(read_response(&mut stream, &mut buffer).await.1, b"hello");
}

/// Waits up to 3 s for `flag`, failing with `what`.
async fn wait_until_set(flag: &AtomicBool, what: &str) {
    let started = Instant::now();
    while !flag.load(Ordering::SeqCst) {
        assert!(started.elapsed() < Duration::from_secs(3), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request_and_its_reply_stream() {
    let (address, handler_dropped, stream_dropped) = protocol_server().await;
    // While the handler runs.
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!handler_dropped.load(Ordering::SeqCst));
    drop(stream);
    wait_until_set(&handler_dropped, "the handler was not dropped").await;
    // While the reply streams.
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /drip HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 512];
    let n = stream.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    assert!(!stream_dropped.load(Ordering::SeqCst));
    drop(stream);
    wait_until_set(&stream_dropped, "the reply stream was not dropped").await;
}
