//! Amazon's DynamoDB Local for tests (feature `testing`).
//!
//! [`shared_endpoint`] gives every test of a process one server: the one named by
//! `CMZ_TEST_DYNAMODB_URL` (CI starts one for the whole run), or one this process starts on
//! a free loopback port. [`DynamoLocal::start`] starts a server of a test's own (for
//! kill-and-restart tests). The server comes from the npm package
//! `amplify-dynamodb-simulator` 2.9.30, which ships `DynamoDBLocal.jar`: it is taken from
//! `CMZ_DYNAMODB_LOCAL_DIR` (the `emulator` folder), or unpacked once into
//! `target/dynamodb-local` with `npm pack`. Java 17 must be installed.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Dynamo, DynamoSettings, TableNames};

/// The simulator package version that ships the DynamoDB Local used in tests.
pub const SIMULATOR_PACKAGE: &str = "amplify-dynamodb-simulator@2.9.30";

/// A DynamoDB Local server this process started; stopped when dropped.
#[derive(Debug)]
pub struct DynamoLocal {
    child: Option<Child>,
    port: u16,
    data_dir: Option<PathBuf>,
}

fn workspace_target() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
}

/// The folder holding `DynamoDBLocal.jar`, unpacking the npm package if needed.
pub fn emulator_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CMZ_DYNAMODB_LOCAL_DIR") {
        return PathBuf::from(dir);
    }
    let root = workspace_target().join("dynamodb-local");
    let emulator = root.join("package").join("emulator");
    if emulator.join("DynamoDBLocal.jar").exists() {
        return emulator;
    }
    std::fs::create_dir_all(&root).expect("create target/dynamodb-local");
    // Unpack into a folder of our own, then rename: several test processes may race here.
    let staging = root.join(format!("staging-{}", std::process::id()));
    std::fs::create_dir_all(&staging).expect("create staging folder");
    let status = Command::new("npm")
        .args(["pack", SIMULATOR_PACKAGE, "--silent"])
        .current_dir(&staging)
        .stdout(Stdio::null())
        .status()
        .expect("npm is needed to fetch DynamoDB Local (or set CMZ_DYNAMODB_LOCAL_DIR)");
    assert!(status.success(), "npm pack {SIMULATOR_PACKAGE} failed");
    let tarball = std::fs::read_dir(&staging)
        .expect("read staging folder")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .expect("npm pack wrote a tarball");
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .current_dir(&staging)
        .status()
        .expect("tar");
    assert!(status.success(), "unpacking {tarball:?} failed");
    let _ = std::fs::remove_file(&tarball);
    if std::fs::rename(staging.join("package"), root.join("package")).is_err() {
        // Another process won the race.
        let _ = std::fs::remove_dir_all(&staging);
    }
    let _ = std::fs::remove_dir_all(&staging);
    emulator
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl DynamoLocal {
    /// Starts a server on a free loopback port: in memory, or keeping its data in
    /// `data_dir` (so a restart on the same folder finds it again). Waits until it answers.
    pub fn start(data_dir: Option<&Path>) -> Self {
        Self::start_on(free_port(), data_dir)
    }

    /// Starts a server on `port` (to restart one that was killed).
    pub fn start_on(port: u16, data_dir: Option<&Path>) -> Self {
        let emulator = emulator_dir();
        let storage = match data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).expect("create the DynamoDB Local data folder");
                format!(
                    "-sharedDb -dbPath {}",
                    shell_quote(&dir.display().to_string())
                )
            }
            None => "-inMemory -sharedDb".to_owned(),
        };
        // The shell stops the server when this process ends, even if it is killed, so no
        // server outlives its tests.
        let script = format!(
            "java -Xmx512m -Djava.library.path={lib} -jar {jar} {storage} -disableTelemetry -port {port} > /dev/null 2>&1 & j=$!; \
             trap 'kill $j 2>/dev/null' EXIT TERM INT; \
             while kill -0 {parent} 2>/dev/null && kill -0 $j 2>/dev/null; do sleep 0.5; done",
            lib = shell_quote(&emulator.join("DynamoDBLocal_lib").display().to_string()),
            jar = shell_quote(&emulator.join("DynamoDBLocal.jar").display().to_string()),
            parent = std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            // DynamoDB Local writes a telemetry id file into its working directory even
            // with telemetry off: keep it in the emulator's folder, out of the source tree.
            .current_dir(&emulator)
            .env("DDB_LOCAL_TELEMETRY", "0")
            .stdin(Stdio::null())
            // Not the test's own output: a watchdog that outlives it by half a second must
            // not hold the test runner's pipes open.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start DynamoDB Local (is java installed?)");
        let server = Self {
            child: Some(child),
            port,
            data_dir: data_dir.map(Path::to_path_buf),
        };
        server.wait_ready(Duration::from_secs(60));
        server
    }

    fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "DynamoDB Local did not listen on port {} within {limit:?}",
            self.port
        );
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (like a crash) and waits until the port is closed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("pkill")
                .args([
                    "-KILL",
                    "-f",
                    "--",
                    &format!("DynamoDBLocal.jar .*-port {}( |$)", self.port),
                ])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again on the same port and data folder.
    pub fn restart(&mut self) {
        self.kill();
        let again = Self::start_on(self.port, self.data_dir.as_deref());
        *self = again;
    }
}

impl Drop for DynamoLocal {
    fn drop(&mut self) {
        self.kill();
    }
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The endpoint every test of this process shares: `CMZ_TEST_DYNAMODB_URL`, or a server
/// started on first use and stopped when the process ends.
pub fn shared_endpoint() -> String {
    static SHARED: OnceLock<(String, Option<DynamoLocal>)> = OnceLock::new();
    SHARED
        .get_or_init(|| match std::env::var("CMZ_TEST_DYNAMODB_URL") {
            Ok(url) if !url.trim().is_empty() => (url, None),
            _ => {
                let server = DynamoLocal::start(None);
                (server.endpoint(), Some(server))
            }
        })
        .0
        .clone()
}

/// Settings for tables of a test's own on `endpoint`: every table name gets a random
/// prefix, so tests sharing a server never see each other's data.
pub fn isolated_settings(endpoint: &str) -> DynamoSettings {
    DynamoSettings {
        tables: TableNames::with_prefix(&format!("t{:08x}-", fastrand::u32(..))),
        cursor_secret: Some(b"cmz-test-cursor-secret".to_vec()),
        ..DynamoSettings::local(endpoint)
    }
}

/// The boto3 script beside cmz-dynamo's tests that writes tables and items the way the
/// legacy Python services and the legacy CloudFormation stack do
/// (`tests/fixtures/legacy_conversation_dynamo.py`; its docstring lists the commands).
pub const LEGACY_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/legacy_conversation_dynamo.py"
);

/// Runs [`LEGACY_FIXTURE`] with `args` (`python3` with `boto3` must be installed) and
/// returns the JSON it printed. Panics, with the script's error output, when it fails.
pub fn legacy_fixture(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(LEGACY_FIXTURE)
        .args(args)
        .output()
        .expect("python3 with boto3 (pip install boto3)");
    assert!(
        out.status.success(),
        "the legacy fixture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the legacy fixture prints JSON")
}

/// A connection to the shared server with freshly created tables of its own.
pub async fn isolated() -> Dynamo {
    let dynamo = Dynamo::connect(isolated_settings(&shared_endpoint())).await;
    dynamo.ensure_tables().await.expect("create test tables");
    dynamo
}

/// Every item of every cmz table of `settings` (skipping tables that do not exist), as
/// `(table, item as JSON)`: for tests that prove what a delete left behind.
pub async fn scan_all_tables(settings: &DynamoSettings) -> Vec<(String, serde_json::Value)> {
    let dynamo = Dynamo::connect(settings.clone()).await;
    let mut found = Vec::new();
    for (_, table) in settings.tables.all() {
        let mut start = None;
        loop {
            let page = dynamo
                .client()
                .scan()
                .table_name(table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await;
            let Ok(page) = page else { break };
            for item in page.items() {
                let json = serde_json::Value::Object(
                    item.iter()
                        .map(|(k, v)| (k.clone(), crate::attr::to_json(v)))
                        .collect(),
                );
                found.push((table.to_owned(), json));
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
    }
    found
}
