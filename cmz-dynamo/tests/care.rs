//! Cost and care on DynamoDB Local, beyond the conformance suite: the token-budget totals
//! under contention, and the care table's keys keeping users apart whatever their ids hold.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use cmz_core::auth::RateLimitStore;
use cmz_core::care::{CareStore, UsageCounts, UsageKey};
use cmz_core::ids::{AnimalId, UserId};
use cmz_dynamo::testing::isolated;

/// Adds and take-backs racing on one total: every call succeeds, the total never goes
/// below 0 (a stored negative total would not read back), and it ends where some order of
/// the calls would have put it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_back_races_adding_and_never_goes_below_zero() {
    let dynamo = isolated().await;
    let limits = dynamo.rate_limits();
    let window = Duration::from_secs(60);
    let key = format!("race:{:x}", fastrand::u64(..));
    limits.add(&key, 30, u64::MAX, window).await.unwrap();
    let calls = (0..24).map(|i| {
        let (limits, key) = (&limits, &key);
        async move {
            let amount = if i % 2 == 0 { 10 } else { -25 };
            limits.add(key, amount, u64::MAX, window).await
        }
    });
    for tally in futures::future::join_all(calls).await {
        assert!(
            tally.unwrap().added,
            "take-backs and adds below the ceiling all apply"
        );
    }
    let total = limits.add(&key, 0, u64::MAX, window).await.unwrap().total;
    assert!(total <= 30 + 12 * 10, "{total}");
    assert_eq!(limits.add(&key, -1_000, 0, window).await.unwrap().total, 0);

    // A ceiling of 0 admits nothing, in a new window as in an open one.
    let closed = format!("closed:{:x}", fastrand::u64(..));
    let refused = limits.add(&closed, 5, 0, window).await.unwrap();
    assert_eq!((refused.total, refused.added), (0, false));
    assert_eq!(limits.add(&closed, 0, 10, window).await.unwrap().total, 0);
    // Totals are not hit counters.
    limits.hit(&closed, window).await.unwrap();
    assert_eq!(limits.add(&closed, 0, 10, window).await.unwrap().total, 0);
}

/// `#` is a valid id character: users `kid` and `kid#lion` (and animals with `#`) keep
/// their own counters, and forgetting one leaves the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_holding_separators_keep_their_own_counters() {
    let dynamo = isolated().await;
    let care = dynamo.care();
    let today = Utc::now().date_naive();
    let key = |user: &str, animal: &str, model: &str| UsageKey {
        day: today,
        user_id: UserId::new(user).unwrap(),
        family_id: None,
        animal_id: AnimalId::new(animal).unwrap(),
        model: model.into(),
    };
    let turn = UsageCounts {
        prompt_tokens: 10,
        completion_tokens: 5,
        turns: 1,
        fallbacks: 0,
    };
    for usage in [
        key("kid", "lion#m", "x"),
        key("kid#lion", "m", "x"),
        key("kid", "lion", "m#x"),
        key("kid", "lion", "m/x"),
    ] {
        care.add_usage(&usage, &turn).await.unwrap();
    }
    let rows = care.usage(today, today).await.unwrap();
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert!(rows.iter().all(|row| row.counts == turn));
    let forgotten = care
        .forget_user(&UserId::new("kid").unwrap(), today - TimeDelta::days(1))
        .await
        .unwrap();
    assert_eq!(forgotten, 3);
    let left = care.usage(today, today).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, key("kid#lion", "m", "x"));
}
