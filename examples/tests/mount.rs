//! Runs the `mount` example as a user would: cmz under `/api` next to the app's own routes.

use std::io::Read as _;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn get(address: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

fn post_json(address: &str, path: &str, body: &str) -> Option<String> {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

#[test]
fn cmz_mounts_under_api_next_to_the_apps_own_routes() {
    let address = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_mount"))
        .env("CMZ_BIND", &address)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let hello = loop {
        if let Some(found) = get(&address, "/hello", None) {
            break found;
        }
        assert!(Instant::now() < deadline, "the example did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    let result = std::panic::catch_unwind(|| {
        assert_eq!(hello.0, 200);
        assert!(hello.1.contains("hello from my own app"));
        let health = get(&address, "/api/system_health", None).unwrap();
        assert_eq!(health.0, 200, "{health:?}");
        assert_eq!(
            get(&address, "/my/profile", None).unwrap().0,
            401,
            "the app's route is behind cmz's RequireAuthLayer"
        );
        let login = post_json(
            &address,
            "/api/auth",
            r#"{"username":"parent@cmz.org","password":"parent123"}"#,
        )
        .unwrap();
        let token = login
            .split("\"token\":\"")
            .nth(1)
            .and_then(|t| t.split('"').next())
            .unwrap()
            .to_owned();
        let profile = get(&address, "/my/profile", Some(&token)).unwrap();
        assert_eq!(profile.0, 200);
        assert!(
            profile.1.contains("you are user_parent_rivera (parent)"),
            "{profile:?}"
        );
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
