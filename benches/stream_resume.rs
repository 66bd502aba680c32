//! What resumable streams cost: the time a streamed turn spends per piece of the reply
//! today (`stream_turn`: nothing kept), with the in-process buffer
//! (`stream_turn_resumable`) and with the buffer mirrored to Redis, in one run; and the
//! memory a finished stream keeps during its grace period.
//!
//! `cargo bench -p cmz-benches --bench stream_resume` (uses `CMZ_TEST_REDIS_URL` if set,
//! else starts Debian's `redis-server`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmz_benches::median;
use cmz_core::access::{OwnerOrAdminPolicy, Principal, UserRole};
use cmz_core::ids::{AnimalId, UserId};
use cmz_core::memory::{InMemoryConversationStore, InMemoryPersonaDirectory};
use cmz_core::service::{ConversationConfig, ConversationService, TurnRequest};
use cmz_core::testing::ScriptedModel;
use cmz_core::types::Persona;
use futures::StreamExt as _;

const PIECES: usize = 300;

fn service(reply: &str, grace: Duration) -> ConversationService {
    let lion = AnimalId::new("lion").expect("id");
    ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion, "Leo",
        )])),
        Arc::new(ScriptedModel::always(reply)),
        Arc::new(OwnerOrAdminPolicy),
        ConversationConfig {
            stream_resume_grace: grace,
            ..ConversationConfig::default()
        },
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Today,
    InProcess,
    Redis,
}

async fn one(service: &ConversationService, kind: Kind, user: usize) -> usize {
    let kid = Principal::new(
        UserId::new(format!("kid{user}")).expect("id"),
        UserRole::Student,
    );
    let request = TurnRequest::new(AnimalId::new("lion").expect("id"), "Tell me everything");
    match kind {
        Kind::Today => {
            service
                .stream_turn(&kid, request)
                .await
                .expect("turn")
                .count()
                .await
        }
        _ => {
            service
                .stream_turn_resumable(&kid, request)
                .await
                .expect("turn")
                .count()
                .await
        }
    }
}

/// Median µs per piece over rounds of `turns` streamed turns.
async fn per_piece(service: &ConversationService, kind: Kind, rounds: usize, turns: usize) -> f64 {
    let mut samples = Vec::new();
    for round in 0..=rounds {
        let started = Instant::now();
        for user in 0..turns {
            let events = one(service, kind, user).await;
            assert!(events >= PIECES, "{events} events");
        }
        if round > 0 {
            samples.push(started.elapsed().as_secs_f64() * 1e6 / (turns * PIECES) as f64);
        }
    }
    median(samples)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let runtime = cmz_benches::runtime();
    let (_server, url) = cmz_benches::redis_url();
    runtime.block_on(async {
        let words: Vec<String> = (0..PIECES).map(|i| format!("word{i}")).collect();
        let reply = words.join(" ");
        let plain = service(&reply, Duration::ZERO);
        let redis = cmz_redis::Redis::connect(&url).await.expect("redis");
        let mirrored = service(&reply, Duration::ZERO)
            .with_stream_mirror(Arc::new(redis.stream_mirror()));
        let today = per_piece(&plain, Kind::Today, 9, 20).await;
        let in_process = per_piece(&plain, Kind::InProcess, 9, 20).await;
        let on_redis = per_piece(&mirrored, Kind::Redis, 5, 4).await;
        println!("a streamed turn of {PIECES} pieces (instant model, in-memory store), per piece:");
        println!("  today (nothing kept)        {today:>8.2} µs");
        println!(
            "  resumable, in process       {in_process:>8.2} µs  (+{:.2} µs, {:.2}×)",
            in_process - today,
            in_process / today
        );
        println!(
            "  resumable, mirrored to Redis {on_redis:>7.2} µs  (+{:.2} µs, {:.2}×)",
            on_redis - today,
            on_redis / today
        );

        // Memory a finished stream keeps for its grace period: the same turns without and
        // with a grace period (both store the conversations), the difference per stream.
        let streams = 2_000;
        let forgotten = service(&reply, Duration::ZERO);
        let before = rss_bytes();
        for user in 0..streams {
            one(&forgotten, Kind::InProcess, user).await;
        }
        let baseline = rss_bytes().saturating_sub(before);
        let kept = service(&reply, Duration::from_secs(600));
        let before = rss_bytes();
        for user in 0..streams {
            one(&kept, Kind::InProcess, user).await;
        }
        let with_kept = rss_bytes().saturating_sub(before);
        assert_eq!(kept.kept_streams(), streams);
        println!(
            "memory per finished stream kept for reconnects ({} bytes of reply, {PIECES} pieces): {:.1} KiB (RSS growth {:.1} KiB/turn kept, {:.1} KiB/turn not kept; {streams} turns each)",
            reply.len(),
            with_kept.saturating_sub(baseline) as f64 / streams as f64 / 1024.0,
            with_kept as f64 / streams as f64 / 1024.0,
            baseline as f64 / streams as f64 / 1024.0,
        );
    });
}
