//! Conformance checks for [`CareStore`]s; every backend runs all of them.

use chrono::{NaiveDate, TimeDelta, Utc};

use crate::care::{
    CareStore, Feedback, ReviewItem, ReviewMark, ReviewReason, ReviewState, UsageCounts, UsageKey,
    Vote,
};
use crate::ids::{AnimalId, FamilyId, MessageId, SessionId, UserId};
use crate::store::PageRequest;

use super::store_suite::random_user;

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", fastrand::u64(..))
}

/// Runs every care-store check. The store may be shared with other tests: each check uses
/// users and days of its own (days far in the past, so the review queue's newest items are
/// never another test's).
pub async fn run_care_store_suite(store: &dyn CareStore) {
    check_usage_counters(store).await;
    check_feedback(store).await;
    check_review_queue(store).await;
    check_forget_user(store).await;
}

fn random_day() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).unwrap() + TimeDelta::days(fastrand::i64(0..3_000))
}

fn usage_key(day: NaiveDate, user: &UserId, animal: &str, model: &str) -> UsageKey {
    UsageKey {
        day,
        user_id: user.clone(),
        family_id: None,
        animal_id: AnimalId::new(animal).unwrap(),
        model: model.into(),
    }
}

const ONE_TURN: UsageCounts = UsageCounts {
    prompt_tokens: 100,
    completion_tokens: 30,
    turns: 1,
    fallbacks: 0,
};

/// Counters add up under concurrency, stay apart by day, user, animal and model, and keep
/// the latest family.
pub async fn check_usage_counters(store: &dyn CareStore) {
    let day = random_day();
    let user = random_user();
    let key = usage_key(day, &user, "lion", "gpt-4o-mini");
    let adds = futures::future::join_all((0..10).map(|_| store.add_usage(&key, &ONE_TURN))).await;
    assert!(adds.iter().all(Result::is_ok));
    let fallback = UsageCounts {
        prompt_tokens: 0,
        completion_tokens: 0,
        turns: 1,
        fallbacks: 1,
    };
    let mut in_family = usage_key(day, &user, "lion", "gpt-4o-mini");
    in_family.family_id = Some(FamilyId::new(unique("fam")).unwrap());
    store.add_usage(&in_family, &fallback).await.unwrap();
    store
        .add_usage(&usage_key(day, &user, "tiger", "gpt-4o-mini"), &ONE_TURN)
        .await
        .unwrap();
    store
        .add_usage(&usage_key(day, &user, "lion", "other-model"), &ONE_TURN)
        .await
        .unwrap();
    store
        .add_usage(
            &usage_key(day.succ_opt().unwrap(), &user, "lion", "gpt-4o-mini"),
            &ONE_TURN,
        )
        .await
        .unwrap();
    let rows: Vec<_> = store
        .usage(day, day)
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.key.user_id == user)
        .collect();
    assert_eq!(
        rows.len(),
        3,
        "contract: one counter per day, user, animal and model"
    );
    let lion = rows
        .iter()
        .find(|r| r.key.animal_id.as_str() == "lion" && r.key.model == "gpt-4o-mini")
        .unwrap();
    assert_eq!(
        lion.counts,
        UsageCounts {
            prompt_tokens: 1_000,
            completion_tokens: 300,
            turns: 11,
            fallbacks: 1
        },
        "contract: concurrent adds are all counted"
    );
    assert_eq!(
        lion.key.family_id, in_family.family_id,
        "the latest family is kept"
    );
    let both: Vec<_> = store
        .usage(day, day.succ_opt().unwrap())
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.key.user_id == user)
        .collect();
    assert_eq!(both.len(), 4, "contract: `to` is included");
    assert_eq!(
        store.user_usage(&user, day).await.unwrap(),
        UsageCounts {
            prompt_tokens: 1_200,
            completion_tokens: 360,
            turns: 13,
            fallbacks: 1
        },
        "contract: one user's day, every animal and model"
    );
    assert_eq!(
        store.user_usage(&random_user(), day).await.unwrap(),
        UsageCounts::default()
    );
}

fn feedback(user: &UserId, session: &SessionId, seq: u64, vote: Vote) -> Feedback {
    Feedback {
        user_id: user.clone(),
        session_id: session.clone(),
        message_id: MessageId::new(uuid::Uuid::new_v4().to_string()).unwrap(),
        seq,
        owner_id: user.clone(),
        vote,
        note: Some("the tiger said tigers live in Africa".into()),
        animal_id: AnimalId::new("tiger").unwrap(),
        persona: "Tara".into(),
        model: Some("gpt-4o-mini".into()),
        at: Utc::now(),
    }
}

/// One vote per user and message: a second replaces the first.
pub async fn check_feedback(store: &dyn CareStore) {
    let user = random_user();
    let other = random_user();
    let session = SessionId::new(unique("s")).unwrap();
    assert_eq!(store.get_feedback(&user, &session, 2).await.unwrap(), None);
    let up = feedback(&user, &session, 2, Vote::Up);
    store.put_feedback(&up).await.unwrap();
    assert_eq!(
        store.get_feedback(&user, &session, 2).await.unwrap(),
        Some(up.clone())
    );
    let mut down = feedback(&user, &session, 2, Vote::Down);
    down.note = None;
    store.put_feedback(&down).await.unwrap();
    assert_eq!(
        store.get_feedback(&user, &session, 2).await.unwrap(),
        Some(down),
        "contract: a second vote replaces the first"
    );
    assert_eq!(store.get_feedback(&other, &session, 2).await.unwrap(), None);
    assert_eq!(store.get_feedback(&user, &session, 4).await.unwrap(), None);
}

fn item(owner: &UserId, at: chrono::DateTime<Utc>, seq: u64, reason: ReviewReason) -> ReviewItem {
    let session = SessionId::new(unique("s")).unwrap();
    ReviewItem {
        id: ReviewItem::id_for(at, &session, seq),
        session_id: session,
        message_id: MessageId::new(uuid::Uuid::new_v4().to_string()).unwrap(),
        seq,
        owner_id: owner.clone(),
        animal_id: AnimalId::new("lion").unwrap(),
        reasons: vec![reason],
        flagged_at: at,
        review: None,
    }
}

/// Newest first, in pages; reasons merge; marking moves an item to the reviewed state once.
pub async fn check_review_queue(store: &dyn CareStore) {
    let owner = random_user();
    // Far in the future, so these are the newest items of a shared store.
    let base = Utc::now() + TimeDelta::days(3_650 + fastrand::i64(0..3_000));
    let items: Vec<ReviewItem> = (0..5)
        .map(|i| {
            item(
                &owner,
                base + TimeDelta::seconds(i),
                2,
                ReviewReason::Fallback,
            )
        })
        .collect();
    for item in &items {
        store.flag(item).await.unwrap();
    }
    let mut again = items[1].clone();
    again.reasons = vec![ReviewReason::ThumbsDown, ReviewReason::Fallback];
    store.flag(&again).await.unwrap();
    let first = store
        .review_items(ReviewState::Open, PageRequest::first(3))
        .await
        .unwrap();
    let ids: Vec<&str> = first.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(
        ids,
        [&items[4].id, &items[3].id, &items[2].id].map(String::as_str),
        "contract: newest first"
    );
    let second = store
        .review_items(
            ReviewState::Open,
            PageRequest {
                limit: 2,
                cursor: first.next.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        second
            .items
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        [&items[1].id, &items[0].id].map(String::as_str),
        "contract: the next page continues where the first ended"
    );
    assert_eq!(
        second.items[0].reasons,
        [ReviewReason::ThumbsDown, ReviewReason::Fallback],
        "contract: reasons merge, sorted, without repeats"
    );
    let fetched = store.get_review_item(&items[2].id).await.unwrap().unwrap();
    assert_eq!(fetched, items[2]);
    let mark = ReviewMark {
        by: random_user(),
        at: Utc::now(),
        note: Some("the fallback was fine".into()),
    };
    let marked = store.mark_reviewed(&items[4].id, &mark).await.unwrap();
    assert_eq!(marked.review.as_ref(), Some(&mark));
    assert_eq!(
        store
            .mark_reviewed(&items[4].id, &mark)
            .await
            .unwrap_err()
            .code(),
        "not_found",
        "contract: only an open item can be marked"
    );
    let open = store
        .review_items(ReviewState::Open, PageRequest::first(1))
        .await
        .unwrap();
    assert_eq!(
        open.items[0].id, items[3].id,
        "a reviewed item leaves the open queue"
    );
    let reviewed = store
        .review_items(ReviewState::Reviewed, PageRequest::first(1))
        .await
        .unwrap();
    assert_eq!(reviewed.items[0], marked);
    assert_eq!(
        store.get_review_item(&items[4].id).await.unwrap(),
        Some(marked)
    );
    // A new reason on a reviewed message opens it again.
    store.flag(&items[4]).await.unwrap();
    let reopened = store.get_review_item(&items[4].id).await.unwrap().unwrap();
    assert_eq!(
        reopened.review, None,
        "contract: flagging again opens the item"
    );
    assert_eq!(
        store
            .mark_reviewed(&unique("0000000000000-1-s"), &mark)
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    for item in &items {
        let _ = store.mark_reviewed(&item.id, &mark).await;
    }
}

/// An erasure removes the user's feedback, queue items and recent counters, and nobody
/// else's.
pub async fn check_forget_user(store: &dyn CareStore) {
    let user = random_user();
    let bystander = random_user();
    let today = Utc::now().date_naive();
    let session = SessionId::new(unique("s")).unwrap();
    store
        .add_usage(&usage_key(today, &user, "lion", "m"), &ONE_TURN)
        .await
        .unwrap();
    store
        .add_usage(
            &usage_key(today - TimeDelta::days(30), &user, "lion", "m"),
            &ONE_TURN,
        )
        .await
        .unwrap();
    store
        .add_usage(&usage_key(today, &bystander, "lion", "m"), &ONE_TURN)
        .await
        .unwrap();
    store
        .put_feedback(&feedback(&user, &session, 2, Vote::Down))
        .await
        .unwrap();
    store
        .put_feedback(&feedback(&bystander, &session, 2, Vote::Up))
        .await
        .unwrap();
    let open = item(&user, Utc::now(), 2, ReviewReason::Redacted);
    let done = item(&user, Utc::now(), 4, ReviewReason::Moderated);
    let kept = item(&bystander, Utc::now(), 2, ReviewReason::Moderated);
    for item in [&open, &done, &kept] {
        store.flag(item).await.unwrap();
    }
    let mark = ReviewMark {
        by: bystander.clone(),
        at: Utc::now(),
        note: None,
    };
    store.mark_reviewed(&done.id, &mark).await.unwrap();
    let forgotten = store
        .forget_user(&user, today - TimeDelta::days(400))
        .await
        .unwrap();
    assert_eq!(forgotten, 5, "two counters, one vote, two queue items");
    let rows = store
        .usage(today - TimeDelta::days(30), today)
        .await
        .unwrap();
    assert!(rows.iter().all(|r| r.key.user_id != user));
    assert!(rows.iter().any(|r| r.key.user_id == bystander));
    assert_eq!(store.get_feedback(&user, &session, 2).await.unwrap(), None);
    assert!(
        store
            .get_feedback(&bystander, &session, 2)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(store.get_review_item(&open.id).await.unwrap(), None);
    assert_eq!(store.get_review_item(&done.id).await.unwrap(), None);
    assert!(store.get_review_item(&kept.id).await.unwrap().is_some());
    assert_eq!(
        store
            .forget_user(&user, today - TimeDelta::days(400))
            .await
            .unwrap(),
        0,
        "contract: repeating it is harmless"
    );
    store.mark_reviewed(&kept.id, &mark).await.unwrap();
}
