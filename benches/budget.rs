//! What a daily token budget adds to a turn: the same turn (instant model, 10 turns of
//! history) with no budget and with user + family + deployment budgets, on the in-memory
//! stores, on DynamoDB Local (conversations and budget counters in DynamoDB) and on
//! DynamoDB with the counters in Redis, in one run. Prints µs per turn (medians of rounds) and the added latency and ratio.
//!
//! `cargo bench -p cmz-benches --bench budget` (uses `CMZ_TEST_DYNAMODB_URL` if set, else
//! starts DynamoDB Local).

use std::sync::Arc;
use std::time::Instant;

use cmz_benches::{median, one_turn, service_with_history};
use cmz_core::access::Principal;
use cmz_core::auth::{DynRateLimitStore, InMemoryRateLimitStore};
use cmz_core::ids::FamilyId;
use cmz_core::memory::InMemoryConversationStore;
use cmz_core::service::Budgets;
use cmz_core::store::ConversationStore;
use cmz_dynamo::Dynamo;
use cmz_dynamo::testing::{isolated_settings, shared_endpoint};

const BUDGETS: Budgets = Budgets {
    user: Some(u64::MAX / 4),
    family: Some(u64::MAX / 4),
    deployment: Some(u64::MAX / 4),
};

/// Median µs per turn over `rounds` rounds of `turns` turns, with and without budgets
/// (alternating, so drift hits both alike).
async fn measure(
    store: Arc<dyn ConversationStore>,
    limits: DynRateLimitStore,
    rounds: usize,
    turns: usize,
) -> (f64, f64) {
    let (plain, principal, session) = service_with_history(store, 10).await;
    let principal = Principal {
        family_id: Some(FamilyId::new("bench_family").expect("id")),
        ..principal
    };
    let budgeted = plain.clone().with_budgets(limits, BUDGETS);
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..rounds + 1 {
        for (service, samples) in [(&plain, &mut without), (&budgeted, &mut with)] {
            let started = Instant::now();
            for _ in 0..turns {
                one_turn(service, &principal, &session).await;
            }
            // The first round warms up (connections, tables, caches).
            if round > 0 {
                samples.push(started.elapsed().as_secs_f64() * 1e6 / turns as f64);
            }
        }
    }
    (median(without), median(with))
}

fn report(name: &str, (without, with): (f64, f64)) {
    println!(
        "{name:<25} no budget {without:>9.1} µs/turn   3 budgets {with:>9.1} µs/turn   added {:>8.1} µs ({:.2}×)",
        with - without,
        with / without
    );
}

fn main() {
    let runtime = cmz_benches::runtime();
    runtime.block_on(async {
        let memory = measure(
            Arc::new(InMemoryConversationStore::new()),
            Arc::new(InMemoryRateLimitStore::new()),
            15,
            400,
        )
        .await;
        let dynamo = Dynamo::connect(isolated_settings(&shared_endpoint())).await;
        dynamo.ensure_tables().await.expect("tables");
        let on_dynamo = measure(
            Arc::new(dynamo.conversations()),
            Arc::new(dynamo.rate_limits()),
            7,
            30,
        )
        .await;
        // The same on DynamoDB with the budgets counted in Redis (cmz-redis), as a
        // deployment with REDIS_URL does.
        let (_server, url) = cmz_benches::redis_url();
        let redis = cmz_redis::Redis::connect(&url).await.expect("redis");
        let on_redis = measure(
            Arc::new(dynamo.conversations()),
            Arc::new(redis.rate_limits()),
            7,
            30,
        )
        .await;
        println!("a turn with daily token budgets (user, family, deployment) against one without");
        report("memory", memory);
        report("dynamodb", on_dynamo);
        report("dynamodb + redis budgets", on_redis);
    });
}
