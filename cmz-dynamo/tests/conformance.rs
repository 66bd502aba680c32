//! The whole `cmz_core::testing` conformance list against the DynamoDB stores, on Amazon's
//! DynamoDB Local.

use cmz_core::testing::{SuiteOptions, run_auth_store_suite, run_conversation_store_suite};
use cmz_dynamo::testing::isolated;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversation_store_conforms() {
    let dynamo = isolated().await;
    let store = dynamo.conversations();
    run_conversation_store_suite(
        &store,
        &SuiteOptions {
            // The 10,000-turn check with its capacity figures is in `cost.rs`.
            long_session_messages: 1_000,
            concurrent_writers: 16,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_stores_conform() {
    let dynamo = isolated().await;
    run_auth_store_suite(
        &dynamo.users(),
        &dynamo.families(),
        &dynamo.revocations(),
        &dynamo.rate_limits(),
    )
    .await;
}
