//! A turn through the engine with an instant model, at history length 10 and 10,000, on
//! cmz's in-memory store and on the legacy layout (one document per conversation,
//! rewritten every turn), in the same run. Prints µs/turn and the ratios.
//!
//! `cargo bench -p cmz-benches --bench turn`

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmz_benches::{LegacyDocumentStore, median, one_turn, service_with_history};
use cmz_core::memory::InMemoryConversationStore;
use cmz_core::store::ConversationStore;
use criterion::{BenchmarkId, Criterion};
use tokio::runtime::Runtime;

const LENGTHS: [usize; 2] = [10, 10_000];

#[derive(Clone, Copy)]
enum Layout {
    Cmz,
    Legacy,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Cmz => "cmz_in_memory",
            Layout::Legacy => "legacy_document",
        }
    }

    fn store(self) -> Arc<dyn ConversationStore> {
        match self {
            Layout::Cmz => Arc::new(InMemoryConversationStore::new()),
            Layout::Legacy => Arc::new(LegacyDocumentStore::new()),
        }
    }

    /// Turns timed on one session before a fresh one is set up, so the history stays
    /// near its nominal length (10 grows to at most 10 + 2 × this).
    fn chunk(self, history: usize) -> u64 {
        match (self, history) {
            (Layout::Cmz, _) => 500,
            (Layout::Legacy, h) if h > 1000 => 5,
            (Layout::Legacy, _) => 100,
        }
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Times `turns` turns, in fresh sessions of `history` messages every `chunk` turns.
fn time_turns(rt: &Runtime, layout: Layout, history: usize, turns: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = turns;
    while left > 0 {
        let n = left.min(layout.chunk(history));
        total += rt.block_on(async {
            let (service, principal, id) = service_with_history(layout.store(), history).await;
            let start = Instant::now();
            for _ in 0..n {
                one_turn(&service, &principal, &id).await;
            }
            start.elapsed()
        });
        left -= n;
    }
    total
}

fn bench_turns(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("turn");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for layout in [Layout::Cmz, Layout::Legacy] {
        for history in LENGTHS {
            group.bench_with_input(
                BenchmarkId::new(layout.name(), history),
                &history,
                |b, &history| {
                    b.iter_custom(|iters| time_turns(&rt, layout, history, iters));
                },
            );
        }
    }
    group.finish();
}

/// Median µs per turn over `runs` runs of one chunk each.
fn median_micros(rt: &Runtime, layout: Layout, history: usize, runs: usize) -> f64 {
    let turns = layout.chunk(history);
    let samples: Vec<f64> = (0..runs)
        .map(|_| time_turns(rt, layout, history, turns).as_secs_f64() * 1e6 / turns as f64)
        .collect();
    median(samples)
}

fn summary() {
    let rt = runtime();
    let cmz: Vec<f64> = LENGTHS
        .iter()
        .map(|&h| median_micros(&rt, Layout::Cmz, h, 21))
        .collect();
    let legacy: Vec<f64> = LENGTHS
        .iter()
        .map(|&h| median_micros(&rt, Layout::Legacy, h, 7))
        .collect();
    println!("\nturn summary (median µs per turn, instant model):");
    println!(
        "{:<18} {:>12} {:>12} {:>14}",
        "layout", "history 10", "history 10k", "10k / 10"
    );
    for (name, v) in [("cmz_in_memory", &cmz), ("legacy_document", &legacy)] {
        println!(
            "{name:<18} {:>12.2} {:>12.2} {:>14.2}",
            v[0],
            v[1],
            v[1] / v[0]
        );
    }
    println!(
        "legacy / cmz at history 10: {:.1}x; at history 10,000: {:.1}x",
        legacy[0] / cmz[0],
        legacy[1] / cmz[1]
    );
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_turns(&mut criterion);
    summary();
    criterion.final_summary();
}
