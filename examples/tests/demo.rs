//! Runs the `demo` server as a user would and checks what a browser gets: the security
//! headers on the page, its script and styles and the API, and a page whose
//! Content-Security-Policy it can satisfy (no inline script, styles or handlers). The CI
//! browser stage (`examples/browser/chat.mjs`) then drives the page in Chromium and fails
//! on any policy violation.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A response: status, headers (names lowercased) and body.
#[derive(Debug)]
struct Fetched {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

fn get(address: &str, path: &str) -> Option<Fetched> {
    send(address, "GET", path)
}

fn send(address: &str, method: &str, path: &str) -> Option<Fetched> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Some(Fetched {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Kills the demo when the test ends, passed or not.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Built with the `dynamo` feature (`--all-features`), the demo would start a DynamoDB
/// Local of its own in one shared data folder, a Java start per test: it uses the tests'
/// server instead (`CMZ_TEST_DYNAMODB_URL`, or one this test process starts), with tables of
/// its own.
#[cfg(feature = "dynamo")]
fn use_the_tests_dynamodb(command: &mut Command) {
    let endpoint = cmz_dynamo::testing::shared_endpoint();
    let settings = cmz_dynamo::testing::isolated_settings(&endpoint);
    command
        .env("DYNAMODB_ENDPOINT_URL", &endpoint)
        .env("CMZ_DYNAMODB_CREATE_TABLES", "1");
    for (variable, table) in settings.tables.all() {
        command.env(variable, table);
    }
}

/// Without the `dynamo` feature the demo keeps everything in memory.
#[cfg(not(feature = "dynamo"))]
fn use_the_tests_dynamodb(_: &mut Command) {}

fn start_demo() -> (Demo, String) {
    let address = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let mut command = Command::new(env!("CARGO_BIN_EXE_demo"));
    command
        .env("CMZ_BIND", &address)
        .env_remove("DYNAMODB_ENDPOINT_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    use_the_tests_dynamodb(&mut command);
    let demo = Demo(command.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&address, "/system_health").is_none() {
        assert!(Instant::now() < deadline, "the demo did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (demo, address)
}

fn assert_security_headers(path: &str, fetched: &Fetched) {
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ] {
        assert_eq!(
            fetched.headers.get(name).map(String::as_str),
            Some(value),
            "{path}: {name} in {:?}",
            fetched.headers
        );
    }
    let policy = &fetched.headers["content-security-policy"];
    assert!(
        policy.contains("frame-ancestors 'none'"),
        "{path}: {policy}"
    );
    assert!(!policy.contains("unsafe"), "{path}: {policy}");
}

/// The directives of a policy, by name.
fn directives(policy: &str) -> HashMap<&str, Vec<&str>> {
    policy
        .split(';')
        .filter_map(|d| {
            let mut words = d.split_whitespace();
            Some((words.next()?, words.collect()))
        })
        .collect()
}

#[test]
fn the_page_and_the_api_carry_security_headers_and_a_policy_the_page_satisfies() {
    let (_demo, address) = start_demo();

    let page = get(&address, "/").unwrap();
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].starts_with("text/html"));
    assert_security_headers("/", &page);
    let policy = directives(&page.headers["content-security-policy"]);
    assert_eq!(policy["default-src"], ["'self'"]);
    assert_eq!(policy["script-src"], ["'self'"]);
    assert_eq!(policy["style-src"], ["'self'"]);
    assert_eq!(policy["connect-src"], ["'self'"]);
    assert_eq!(policy["frame-ancestors"], ["'none'"]);

    // Nothing inline for the policy to block: every script is a file, there are no
    // <style> elements, style attributes or event-handler attributes.
    let html = page.body.to_ascii_lowercase();
    let scripts: Vec<&str> = html.split("<script").skip(1).collect();
    assert!(!scripts.is_empty(), "the page has a script");
    for script in &scripts {
        let tag = script.split('>').next().unwrap_or_default();
        assert!(
            tag.contains("src=\"/chat.js\""),
            "inline script: <script{tag}>"
        );
        let content = script
            .split_once('>')
            .map(|(_, rest)| rest.split("</script>").next().unwrap_or_default())
            .unwrap_or_default();
        assert!(content.trim().is_empty(), "a script with a body: {content}");
    }
    assert!(!html.contains("<style"), "an inline <style> element");
    assert!(!html.contains(" style="), "an inline style attribute");
    for word in html.split(|c: char| c.is_whitespace()) {
        let attribute = word.split('=').next().unwrap_or_default();
        assert!(
            !(attribute.starts_with("on") && word.contains('=') && attribute.len() > 2),
            "an event-handler attribute: {word}"
        );
    }
    assert!(html.contains("href=\"/chat.css\""));

    for (path, kind) in [("/chat.js", "text/javascript"), ("/chat.css", "text/css")] {
        let file = get(&address, path).unwrap();
        assert_eq!(file.status, 200, "{path}");
        assert!(file.headers["content-type"].starts_with(kind), "{path}");
        assert!(!file.body.is_empty(), "{path}");
        assert_security_headers(path, &file);
    }

    // The API's responses, errors included, carry the strict policy.
    for (path, status) in [
        ("/system_health", 200),
        ("/me", 401),
        ("/no/such/page", 404),
    ] {
        let api = get(&address, path).unwrap();
        assert_eq!(api.status, status, "{path}: {}", api.body);
        assert_security_headers(path, &api);
        assert_eq!(
            api.headers["content-security-policy"], "default-src 'none'; frame-ancestors 'none'",
            "{path}"
        );
    }
}

#[test]
fn a_method_the_page_does_not_serve_is_the_apis_json_405() {
    let (_demo, address) = start_demo();
    for (method, path) in [("POST", "/"), ("DELETE", "/chat.js"), ("PUT", "/chat.css")] {
        let fetched = send(&address, method, path).unwrap();
        assert_eq!(fetched.status, 405, "{method} {path}");
        assert!(
            fetched.headers["content-type"].starts_with("application/json"),
            "{method} {path}: {:?}",
            fetched.headers
        );
        assert!(
            fetched.body.contains(r#""code":"method_not_allowed""#),
            "{method} {path}: {}",
            fetched.body
        );
    }
    // The API's routes answer the same way.
    let api = send(&address, "DELETE", "/system_health").unwrap();
    assert_eq!(api.status, 405);
    assert!(
        api.body.contains(r#""code":"method_not_allowed""#),
        "{}",
        api.body
    );
}

/// The server's peak resident memory (`VmHWM`) in KiB, from Linux's `/proc`.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

fn post_login(address: &str, password: &str) -> Option<u16> {
    let body = format!(r#"{{"username":"admin@cmz.org","password":"{password}"}}"#);
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .ok()?;
    write!(
        stream,
        "POST /auth HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// 100 wrong logins for one account at once, against the running server: at most the limit
/// is checked (401), the rest are refused before any hash (429), and the server's peak
/// memory stays bounded (each argon2id check takes 19 MiB, and at most one per core runs).
/// Before the login rework all 100 were checked and the server grew to 1.37 GB.
#[cfg(target_os = "linux")]
#[test]
fn a_hundred_concurrent_wrong_logins_are_bounded_in_checks_and_memory() {
    let (demo, address) = start_demo();
    let pid = demo.0.id();
    let before = peak_rss_kib(pid).expect("the demo's peak RSS");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let (address, barrier) = (address.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                post_login(&address, &format!("wrong-password-{i}"))
            })
        })
        .collect();
    let statuses: Vec<u16> = threads
        .into_iter()
        .map(|t| t.join().unwrap().expect("an answer"))
        .collect();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked + refused, 100, "{statuses:?}");
    assert!(checked <= 5, "{checked} wrong passwords were checked");
    let peak = peak_rss_kib(pid).expect("the demo's peak RSS");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    // The server before, plus at most one 19 MiB hash per core, plus slack.
    let bound = before + cores * 20 * 1024 + 48 * 1024;
    println!(
        "checked {checked}, refused {refused}; peak RSS {} MiB (was {} MiB before; bound {} MiB)",
        peak / 1024,
        before / 1024,
        bound / 1024
    );
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB over {bound} KiB (before: {before} KiB)"
    );
}
