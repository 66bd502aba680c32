//! Streamed-reply overhead: cmz reading a 200-chunk Chat Completions stream from a loopback
//! server, against the official Python `openai` SDK reading the same stream from the same
//! server in the same run. Prints time to first delta, per-chunk overhead and the ratio.
//!
//! `cargo bench -p cmz-benches --bench openai_stream` (needs `pip install openai`).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmz_benches::{bench_personas, median};
use cmz_core::chat::{ChatChunk, ChatMessage, ChatModel, ChatRequest};
use cmz_core::prelude::*;
use cmz_openai::testing::{Behavior, FakeOpenAi, Reply};
use cmz_openai::{OpenAiChatModel, OpenAiConfig};
use criterion::Criterion;
use futures::StreamExt as _;

const CHUNKS: usize = 200;
const RUNS: usize = 31;

/// (time to first delta in ms, per-chunk overhead in µs) of a stream started at `start`,
/// counting the items `is_delta` accepts.
async fn time_deltas<S, T>(
    start: Instant,
    mut stream: S,
    is_delta: impl Fn(&T) -> bool,
) -> (f64, f64)
where
    S: futures::Stream<Item = T> + Unpin,
{
    let mut first = None;
    let mut deltas = 0;
    while let Some(item) = stream.next().await {
        if is_delta(&item) {
            deltas += 1;
            first.get_or_insert_with(|| start.elapsed());
        }
    }
    assert_eq!(deltas, CHUNKS);
    let (first, total) = (first.expect("a delta"), start.elapsed());
    (
        first.as_secs_f64() * 1e3,
        (total - first).as_secs_f64() * 1e6 / (CHUNKS - 1) as f64,
    )
}

async fn cmz_model_once(model: &OpenAiChatModel) -> (f64, f64) {
    let request = ChatRequest {
        messages: vec![ChatMessage::new(Role::User, "Tell me a long story")],
        ..Default::default()
    };
    let start = Instant::now();
    let stream = model.stream(request).await.expect("stream");
    time_deltas(start, stream, |item| {
        matches!(item, Ok(ChatChunk::Delta(_)))
    })
    .await
}

async fn cmz_turn_once(service: &ConversationService, principal: &Principal) -> (f64, f64) {
    let start = Instant::now();
    let stream = service
        .stream_turn(
            principal,
            TurnRequest::new(AnimalId::new("lion").expect("id"), "Tell me a long story"),
        )
        .await
        .expect("stream");
    time_deltas(start, stream, |event| {
        matches!(event, Ok(TurnEvent::Delta(_)))
    })
    .await
}

fn python_sdk(base_url: &str) -> Option<(f64, f64)> {
    let script = format!(
        r#"
import time, statistics, openai
client = openai.OpenAI(base_url="{base_url}", api_key="sk-bench", max_retries=0)
firsts, per_chunk = [], []
for _ in range({RUNS}):
    start = time.perf_counter()
    stream = client.chat.completions.create(model="fake-gpt", messages=[{{"role": "user", "content": "Tell me a long story"}}],
                                            stream=True, stream_options={{"include_usage": True}})
    first, deltas = None, 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
            if first is None:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    assert deltas == {CHUNKS}, deltas
    firsts.append(first * 1e3)
    per_chunk.append((total - first) * 1e6 / ({CHUNKS} - 1))
print(statistics.median(firsts), statistics.median(per_chunk), openai.__version__)
"#
    );
    let output = Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    if !output.status.success() {
        eprintln!(
            "python openai SDK run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let mut parts = text.split_whitespace();
    let first = parts.next()?.parse().ok()?;
    let chunk = parts.next()?.parse().ok()?;
    println!("  (python openai SDK {})", parts.next().unwrap_or("?"));
    Some((first, chunk))
}

fn main() {
    // The server gets its own runtime thread, as a separate server process would; the
    // readers (cmz here, Python in its own process) each run single-threaded.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = server_rt.block_on(FakeOpenAi::start());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let chunks: Vec<String> = (0..CHUNKS).map(|i| format!("word{i} ")).collect();
    server.set_default(Behavior::Reply(
        Reply::chunks(chunks).with_usage(60, CHUNKS as u32),
    ));
    let model = OpenAiChatModel::new(
        OpenAiConfig::new(server.base_url(), "fake-gpt").with_api_key("sk-bench"),
    )
    .expect("model");
    let service = ConversationService::new(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(bench_personas()),
        Arc::new(model.clone()),
    );
    let principal = Principal::new(UserId::new("bench_kid").expect("id"), UserRole::Student);

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("openai_stream");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    group.bench_function("cmz_model_200_chunks", |b| {
        b.iter(|| rt.block_on(cmz_model_once(&model)))
    });
    group.bench_function("cmz_stream_turn_200_chunks", |b| {
        b.iter(|| rt.block_on(cmz_turn_once(&service, &principal)))
    });
    group.finish();

    let runs = |f: &dyn Fn() -> (f64, f64)| -> (f64, f64) {
        let samples: Vec<(f64, f64)> = (0..RUNS).map(|_| f()).collect();
        (
            median(samples.iter().map(|s| s.0).collect()),
            median(samples.iter().map(|s| s.1).collect()),
        )
    };
    let raw = runs(&|| rt.block_on(cmz_model_once(&model)));
    let turn = runs(&|| rt.block_on(cmz_turn_once(&service, &principal)));
    println!(
        "\nstreamed reply of {CHUNKS} chunks from the loopback server (median of {RUNS} runs):"
    );
    println!(
        "{:<34} {:>16} {:>18}",
        "reader", "first delta (ms)", "per chunk (µs)"
    );
    println!(
        "{:<34} {:>16.3} {:>18.2}",
        "cmz OpenAiChatModel::stream", raw.0, raw.1
    );
    println!(
        "{:<34} {:>16.3} {:>18.2}",
        "cmz ConversationService::stream_turn", turn.0, turn.1
    );
    match python_sdk(&server.base_url()) {
        Some(py) => {
            println!(
                "{:<34} {:>16.3} {:>18.2}",
                "python openai SDK (stream=True)", py.0, py.1
            );
            println!(
                "per-chunk overhead, python SDK / cmz model: {:.1}x; / cmz stream_turn: {:.1}x",
                py.1 / raw.1,
                py.1 / turn.1
            );
            println!(
                "time to first delta, python SDK / cmz model: {:.1}x",
                py.0 / raw.0
            );
        }
        None => println!("python openai SDK not available: pip install openai"),
    }
    criterion.final_summary();
}
