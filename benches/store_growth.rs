//! What a new session costs the in-memory store as it grows: two million sessions of one
//! user with one animal (what the HTTP benchmark does, a new conversation per request),
//! made one at a time. Prints, for each 500,000, the mean time of `create_session` and the
//! longest single call so far (a pause every request on that shard waits out).
//!
//! `cargo bench -p cmz-benches --bench store_growth` (`-- 500000` for fewer sessions)

use std::time::{Duration, Instant};

use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::memory::InMemoryConversationStore;
use cmz_core::store::ConversationStore;
use cmz_core::types::Session;

const REPORT_EVERY: usize = 500_000;

fn main() {
    let sessions: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(2_000_000);
    let runtime = cmz_benches::runtime();
    let store = InMemoryConversationStore::new();
    let user = UserId::new("user_student_ana").expect("a valid id");
    let animal = AnimalId::new("cougar").expect("a valid id");
    println!("in-memory store, one user and one animal, {sessions} new sessions:");
    let (mut spent, mut longest, mut reported) = (Duration::ZERO, Duration::ZERO, 0);
    runtime.block_on(async {
        for n in 1..=sessions {
            let id = SessionId::new(format!("00000000-0000-4000-8000-{n:012}")).expect("an id");
            let session = Session::new(id, user.clone(), animal.clone(), "Cougar");
            let started = Instant::now();
            store.create_session(&session).await.expect("a new session");
            let took = started.elapsed();
            spent += took;
            longest = longest.max(took);
            if n % REPORT_EVERY == 0 || n == sessions {
                let batch = n - reported;
                reported = n;
                println!(
                    "  {n:>9} sessions: {:>6.0} ns a session over the last {batch}, longest call so far {:.2} ms",
                    spent.as_nanos() as f64 / batch as f64,
                    longest.as_secs_f64() * 1e3
                );
                spent = Duration::ZERO;
            }
        }
    });
}
