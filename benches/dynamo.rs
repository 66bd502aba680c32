//! cmz's DynamoDB conversation store against the legacy boto3 `list_append` path, on
//! Amazon's DynamoDB Local, in the same run: write capacity, requests and latency of a
//! turn at turns 1, 100, 400 and 1,000, read capacity of a 10-turn window, and the turn at
//! which the legacy path fails.
//!
//! `cargo bench -p cmz-benches --bench dynamo` (needs Java, npm and `pip install boto3`;
//! uses `CMZ_TEST_DYNAMODB_URL` if set, else starts DynamoDB Local).

use std::process::Command;
use std::time::{Duration, Instant};

use cmz_benches::median;
use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::store::{ConversationStore, TurnAppend};
use cmz_core::types::{NewMessage, Role, Session};
use cmz_dynamo::Dynamo;
use cmz_dynamo::testing::{isolated_settings, shared_endpoint};
use serde_json::Value;

const TURNS: u64 = 1_000;
const CHECKPOINTS: [u64; 4] = [1, 100, 400, 1_000];
/// Turns timed around each checkpoint (the checkpoint and the ones after it).
const AROUND: u64 = 5;

struct Point {
    turn: u64,
    wcu: f64,
    requests: u64,
    latency: Duration,
    window_rcu: f64,
}

fn turn(id: &SessionId, expected: u64, new_session: Option<Session>) -> TurnAppend {
    TurnAppend {
        session_id: id.clone(),
        expected_count: expected,
        messages: vec![
            NewMessage::new(Role::User, "q".repeat(90)),
            NewMessage::new(Role::Assistant, "a".repeat(600)),
        ],
        turn_key: None,
        new_session,
        began_at: chrono::Utc::now(),
    }
}

async fn cmz(dynamo: &Dynamo) -> Vec<Point> {
    let store = dynamo.conversations();
    let (user, animal) = (
        UserId::new("bench_user").unwrap(),
        AnimalId::new("lion").unwrap(),
    );
    let id = SessionId::generate(&animal, &user).unwrap();
    let session = Session::new(id.clone(), user, animal, "Leo");
    let mut points = Vec::new();
    let mut latencies = Vec::new();
    let mut current: Option<(u64, f64, u64)> = None;
    for t in 1..=TURNS + AROUND {
        let before = dynamo.capacity();
        let started = Instant::now();
        store
            .append_turn(turn(&id, 2 * (t - 1), (t == 1).then(|| session.clone())))
            .await
            .unwrap();
        let elapsed = started.elapsed();
        let cost = dynamo.capacity() - before;
        if CHECKPOINTS.contains(&t) {
            current = Some((t, cost.write_units, cost.requests));
            latencies.clear();
        }
        if let Some((at, wcu, requests)) = current {
            latencies.push(elapsed);
            if t == at + AROUND - 1 {
                let before = dynamo.capacity();
                store.recent_messages(&id, 20).await.unwrap();
                let read = dynamo.capacity() - before;
                points.push(Point {
                    turn: at,
                    wcu,
                    requests,
                    latency: Duration::from_secs_f64(median(
                        latencies.iter().map(Duration::as_secs_f64).collect(),
                    )),
                    window_rcu: read.read_units,
                });
                current = None;
            }
        }
    }
    points
}

fn legacy(dynamo: &Dynamo) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/dynamo/legacy_path.py");
    let out = Command::new("python3")
        .args([
            script,
            "--endpoint",
            &shared_endpoint(),
            "--conversations",
            &dynamo.tables().conversations,
            "--sessions",
            &dynamo.tables().sessions,
            "--turns",
            &TURNS.to_string(),
        ])
        .output()
        .expect("python3 with boto3");
    assert!(
        out.status.success(),
        "legacy path: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::main]
async fn main() {
    let dynamo = Dynamo::connect(isolated_settings(&shared_endpoint())).await;
    dynamo.ensure_tables().await.unwrap();
    println!(
        "DynamoDB Local at {}; a turn = 90-character question + 600-character answer",
        shared_endpoint()
    );
    let ours = cmz(&dynamo).await;
    let theirs = legacy(&dynamo);
    let legacy_points = theirs["checkpoints"].as_array().unwrap();
    println!();
    println!(
        "| turn | cmz WCU | legacy WCU | WCU ratio | cmz requests | legacy requests | cmz latency | legacy latency | cmz window RCU | legacy window RCU |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for point in &ours {
        let legacy = legacy_points
            .iter()
            .find(|p| p["turn"].as_u64() == Some(point.turn));
        let cell = |key: &str| legacy.and_then(|l| l[key].as_f64());
        let fmt =
            |v: Option<f64>, unit: &str| v.map_or("fails".to_owned(), |v| format!("{v:.1}{unit}"));
        println!(
            "| {} | {:.1} | {} | {} | {} | {} | {:.2} ms | {} | {:.1} | {} |",
            point.turn,
            point.wcu,
            fmt(cell("wcu"), ""),
            cell("wcu").map_or("—".to_owned(), |w| format!("{:.1}×", w / point.wcu)),
            point.requests,
            legacy.map_or("—".to_owned(), |l| l["requests"].to_string()),
            point.latency.as_secs_f64() * 1000.0,
            fmt(cell("latencyMs"), " ms"),
            point.window_rcu,
            fmt(cell("windowRcu"), ""),
        );
    }
    match theirs["failedAt"].as_u64() {
        Some(turn) => println!(
            "\nthe legacy path fails at turn {turn}: {}",
            theirs["error"].as_str().unwrap_or_default()
        ),
        None => println!("\nthe legacy path did not fail within {TURNS} turns"),
    }
    if let (Some(ours), Some(legacy)) = (
        ours.iter().find(|p| p.turn == 400),
        legacy_points
            .iter()
            .find(|p| p["turn"].as_u64() == Some(400)),
    ) {
        println!(
            "at turn 400: {:.0}× fewer WCU than legacy (target ≥ 60×), window read {:.1} RCU vs {:.1}",
            legacy["wcu"].as_f64().unwrap() / ours.wcu,
            ours.window_rcu,
            legacy["windowRcu"].as_f64().unwrap()
        );
    }
}
