//! A 500-turn conversation through the engine (in-memory store, a scripted model with
//! 600-character replies), three ways in the same run: the fixed window of the last 10
//! turns (what cmz did before: no budget, no summary), the same 10-turn cap with the
//! running summary, and a 1,500-token budget with the running summary. Prints, at turns
//! 10, 100 and 500, the prompt tokens of the turn and the store requests per turn (the
//! mean of the 8 turns up to it, so summary writes are amortized), then the summary's
//! amortized cost and whether the dog's name from turn 3 still reaches the model at turn
//! 400.
//!
//! `cargo bench -p cmz-benches --bench long_conversation`

use std::sync::Arc;
use std::time::Instant;

use cmz_core::memory::InMemoryConversationStore;
use cmz_core::service::ConversationConfig;
use cmz_core::testing::{LongConversationOptions, run_long_conversation};
use cmz_core::types::Role;

const TURNS: usize = 500;
const AT: [usize; 3] = [10, 100, 500];

fn main() {
    let runtime = cmz_benches::runtime();
    // Load the encoding's tables before timing anything.
    cmz_core::tokens::Tokenizer::default().count("warm up");
    let fixed = ConversationConfig {
        context_window: 10,
        context_budget_tokens: u32::MAX,
        summary_every_turns: 0,
        ..ConversationConfig::default()
    };
    let capped = ConversationConfig {
        context_window: 10,
        ..ConversationConfig::default()
    };
    let budget = ConversationConfig {
        context_window: 10,
        context_budget_tokens: 1_500,
        ..ConversationConfig::default()
    };
    let runs = [
        ("fixed 10-turn window (before)", fixed),
        ("10-turn cap + running summary", capped),
        ("1,500-token budget + summary", budget),
    ];
    println!(
        "{:<32} {:>24} {:>27} {:>10} {:>9}",
        "", "prompt tokens @10/100/500", "store requests/turn @10/100/500", "ms/turn", "turn 400"
    );
    let mut baseline_tokens = 0u64;
    for (name, config) in runs {
        let options = LongConversationOptions {
            turns: TURNS,
            config,
            reply_chars: 600,
        };
        let started = Instant::now();
        let report = runtime.block_on(run_long_conversation(
            Arc::new(InMemoryConversationStore::new()),
            &options,
        ));
        let ms_per_turn = started.elapsed().as_secs_f64() * 1000.0 / TURNS as f64;
        let tokens: Vec<String> = AT
            .iter()
            .map(|&n| report.prompt_tokens[n - 1].to_string())
            .collect();
        let requests: Vec<String> = AT
            .iter()
            .map(|&n| {
                let stretch = &report.store_requests[n - 8..n];
                format!("{:.2}", stretch.iter().sum::<u64>() as f64 / 8.0)
            })
            .collect();
        let remembers = report.requests[399]
            .messages
            .iter()
            .any(|m| m.role == Role::System && m.content.contains("Biscuit"));
        println!(
            "{name:<32} {:>24} {:>27} {ms_per_turn:>10.3} {:>9}",
            tokens.join(" / "),
            requests.join(" / "),
            if remembers { "remembers" } else { "forgot" }
        );
        let total: u64 = report.prompt_tokens.iter().map(|&t| u64::from(t)).sum();
        if baseline_tokens == 0 {
            baseline_tokens = total;
        }
        let summary_cost = report.summary.as_ref().map_or(String::new(), |s| {
            format!(
                "; summary: {} folds, {:.1} model tokens/turn amortized ({} tokens long)",
                s.folds,
                s.tokens_spent as f64 / TURNS as f64,
                s.tokens
            )
        });
        println!(
            "{:<32} all turns: {total} prompt tokens ({:.2}x the fixed window){summary_cost}",
            "",
            total as f64 / baseline_tokens as f64
        );
    }
}
