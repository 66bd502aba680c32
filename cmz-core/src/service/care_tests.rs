//! Budgets, usage counters, feedback and the review queue in the engine (memory backends).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use super::*;
use crate::access::UserRole;
use crate::auth::{AuditKind, InMemoryAuditSink, InMemoryRateLimitStore};
use crate::care::{CareStore, ReviewReason, ReviewState, Vote};
use crate::ids::{FamilyId, MessageId};
use crate::memory::{InMemoryCareStore, InMemoryConversationStore, InMemoryPersonaDirectory};
use crate::store::ConversationStore as _;
use crate::testing::{Failure, ScriptedModel, Step};

fn lion() -> AnimalId {
    AnimalId::new("lion").unwrap()
}

fn tiger() -> AnimalId {
    AnimalId::new("tiger").unwrap()
}

fn service(model: ScriptedModel) -> ConversationService {
    let personas = InMemoryPersonaDirectory::with_personas([
        Persona::new(lion(), "Leo"),
        Persona::new(tiger(), "Tara"),
    ]);
    ConversationService::new(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(personas),
        Arc::new(model),
    )
}

fn kid(name: &str) -> Principal {
    Principal::new(UserId::new(name).unwrap(), UserRole::Student)
}

fn in_family(name: &str, family: &str) -> Principal {
    Principal {
        family_id: Some(FamilyId::new(family).unwrap()),
        ..kid(name)
    }
}

fn keeper() -> Principal {
    Principal::new(UserId::new("keeper1").unwrap(), UserRole::Zookeeper)
}

fn today() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_turns_at_the_edge_overspend_by_at_most_one_turn() {
    // No usage reported: each turn is settled at the tokenizer's estimate, which the
    // reservation (prompt + reply limit) always covers.
    let model = ScriptedModel::echo()
        .with_usage(None)
        .with_chunk_delay(Duration::from_millis(20));
    let limits = Arc::new(InMemoryRateLimitStore::new());
    let config = ConversationConfig {
        max_tokens: Some(40),
        ..Default::default()
    };
    let service = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion(),
            "Leo",
        )])),
        Arc::new(model),
        Arc::new(OwnerOrAdminPolicy),
        config,
    );
    // Find one turn's reservation first, with a budget nobody reaches.
    let probe = service.clone().with_budgets(
        Arc::new(InMemoryRateLimitStore::new()),
        Budgets {
            deployment: Some(u64::MAX),
            ..Default::default()
        },
    );
    let one = probe
        .turn(&kid("probe"), TurnRequest::new(lion(), "hello there"))
        .await
        .unwrap();
    let cost = one.quota.unwrap().budgets[0].used;
    assert!(cost > 0);
    let budget = cost * 5 + cost / 2;
    let service = service.with_budgets(
        limits.clone(),
        Budgets {
            deployment: Some(budget),
            ..Default::default()
        },
    );
    let turns = (0..20).map(|i| {
        let service = service.clone();
        async move {
            let me = kid(&format!("k{i}"));
            match service
                .stream_turn(&me, TurnRequest::new(lion(), "hello there"))
                .await
            {
                Ok(stream) => {
                    let events: Vec<_> = stream.collect().await;
                    assert!(matches!(events.last(), Some(Ok(TurnEvent::Complete(_)))));
                    Ok(())
                }
                Err(error) => Err(error),
            }
        }
    });
    let results = futures::future::join_all(turns).await;
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), "rate_limit_exceeded");
        let exceeded = refused.budget_exceeded().expect("a budget refused it").0;
        assert_eq!(exceeded.scope, BudgetScope::Deployment);
        assert_eq!(exceeded.budget, budget);
    }
    let spent = service.budget_status(&kid("anyone")).await.unwrap()[0].used;
    assert!(
        (5..20).contains(&admitted),
        "{admitted} of 20 turns admitted"
    );
    assert!(
        spent <= budget + cost,
        "spent {spent} of {budget}: over by more than one turn ({cost})"
    );
    // Reservations (prompt + reply limit) are larger than what a turn is settled to, so a
    // day at the edge may end a little under its budget, never more than a turn over it.
    assert!(
        spent + cost * 2 >= budget,
        "the budget was used ({spent} of {budget})"
    );
}

#[tokio::test]
async fn a_user_over_budget_is_refused_with_the_budget_and_the_reset_and_nothing_is_stored() {
    let limits = Arc::new(InMemoryRateLimitStore::new());
    let store = Arc::new(InMemoryConversationStore::new());
    let service = ConversationService::new(
        store.clone(),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion(),
            "Leo",
        )])),
        Arc::new(ScriptedModel::echo()),
    )
    .with_budgets(
        limits,
        Budgets {
            user: Some(20),
            family: Some(40),
            deployment: None,
        },
    );
    let me = in_family("k1", "fam1");
    // Echo reports 15 tokens a turn: the first turn fits, the second starts at 15 < 20.
    let first = service
        .turn(&me, TurnRequest::new(lion(), "one"))
        .await
        .unwrap();
    let budgets = first.quota.as_ref().unwrap().budgets.clone();
    assert_eq!(
        budgets
            .iter()
            .map(|b| (b.scope, b.used))
            .collect::<Vec<_>>(),
        [(BudgetScope::User, 15), (BudgetScope::Family, 15)],
        "settled to the usage the model reported"
    );
    service
        .turn(
            &me,
            TurnRequest::new(lion(), "two").in_session(first.session_id.clone()),
        )
        .await
        .unwrap();
    let err = service
        .turn(
            &me,
            TurnRequest::new(lion(), "three").in_session(first.session_id.clone()),
        )
        .await
        .unwrap_err();
    let exceeded = err.budget_exceeded().unwrap().0;
    assert_eq!(
        (exceeded.scope, exceeded.budget, exceeded.used),
        (BudgetScope::User, 20, 30)
    );
    let midnight = budget::day_end(chrono::Utc::now());
    assert_eq!(exceeded.resets_at, midnight);
    let Error::RateLimited {
        retry_after,
        message,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(message, BUDGET_MESSAGE);
    let wait = retry_after.unwrap().as_secs() as i64;
    assert!((wait - (midnight - chrono::Utc::now()).num_seconds()).abs() <= 2);
    assert_eq!(
        store
            .get_session(&first.session_id)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        4,
        "nothing stored for the refused turn"
    );
    // The family shares 40: a sibling has 10 left, so one turn, then the family refuses.
    let sibling = in_family("k2", "fam1");
    service
        .turn(&sibling, TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    let err = service
        .stream_turn(&sibling, TurnRequest::new(lion(), "again"))
        .await
        .unwrap_err();
    assert_eq!(err.budget_exceeded().unwrap().0.scope, BudgetScope::Family);
    // Another family is not affected.
    service
        .turn(&in_family("k3", "fam2"), TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reservation_is_given_back_when_the_turn_is_not_stored() {
    let limits = Arc::new(InMemoryRateLimitStore::new());
    let model = ScriptedModel::echo();
    let service = service(model.clone()).with_budgets(
        limits,
        Budgets {
            user: Some(10_000),
            ..Default::default()
        },
    );
    let config_error = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion(),
            "Leo",
        )])),
        Arc::new(model.clone()),
        Arc::new(OwnerOrAdminPolicy),
        ConversationConfig {
            on_model_failure: ModelFailurePolicy::Error,
            ..Default::default()
        },
    )
    .with_budgets(
        Arc::new(InMemoryRateLimitStore::new()),
        Budgets {
            user: Some(10_000),
            ..Default::default()
        },
    );
    let me = kid("k1");
    model.push(Step::Fail(Failure::Unavailable));
    assert!(
        config_error
            .turn(&me, TurnRequest::new(lion(), "hi"))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        config_error.budget_status(&me).await.unwrap()[0].used,
        0,
        "a turn that stored no reply spent nothing"
    );
    // A fallback reply is not the model's work either.
    model.push(Step::Fail(Failure::Unavailable));
    let fallback = service
        .turn(&me, TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    assert!(fallback.fallback);
    assert_eq!(fallback.quota.unwrap().budgets[0].used, 0);
}

#[tokio::test]
async fn the_reply_says_where_the_caller_stands() {
    let limits = Arc::new(InMemoryRateLimitStore::new());
    let service = service(ScriptedModel::echo())
        .with_turn_limit(limits.clone(), 50, Duration::from_secs(3600))
        .with_budgets(
            limits,
            Budgets {
                user: Some(1_000),
                ..Default::default()
            },
        )
        .with_care(Arc::new(InMemoryCareStore::new()));
    let me = kid("k1");
    let first = service
        .turn(&me, TurnRequest::new(lion(), "one"))
        .await
        .unwrap();
    let second = service
        .turn(&me, TurnRequest::new(tiger(), "two"))
        .await
        .unwrap();
    let quota = second.quota.unwrap();
    let limit = quota.turn_limit.unwrap();
    assert_eq!((limit.limit, limit.used), (50, 2));
    assert_eq!(quota.calls_today, Some(2));
    assert_eq!(quota.budgets[0].used, 30);
    assert_eq!(quota.budgets[0].remaining(), 970);
    assert!(first.quota.is_some());
    // A replayed turn (same key) is not counted again and says nothing.
    let keyed = TurnRequest::new(lion(), "three").with_turn_key("key-1");
    let a = service.turn(&me, keyed.clone()).await.unwrap();
    let b = service.turn(&me, keyed).await.unwrap();
    assert!(b.replayed && a.quota.is_some() && b.quota.is_none());
}

#[tokio::test]
async fn usage_is_counted_as_turns_are_stored_and_reported_by_any_grouping() {
    let care = Arc::new(InMemoryCareStore::new());
    let model = ScriptedModel::echo();
    let service = service(model.clone()).with_care(care.clone());
    let one = in_family("k1", "fam1");
    let two = kid("k2");
    service
        .turn(&one, TurnRequest::new(lion(), "a"))
        .await
        .unwrap();
    service
        .turn(&one, TurnRequest::new(tiger(), "b"))
        .await
        .unwrap();
    let stream = service
        .stream_turn(&two, TurnRequest::new(lion(), "c"))
        .await
        .unwrap();
    let _: Vec<_> = stream.collect().await;
    model.push(Step::Fail(Failure::Unavailable));
    service
        .turn(&two, TurnRequest::new(lion(), "d"))
        .await
        .unwrap();

    let admin = Principal::new(UserId::new("admin1").unwrap(), UserRole::Admin);
    let all = service
        .usage_report(&admin, today(), today(), UsageGrouping::default())
        .await
        .unwrap();
    assert_eq!(all.rows.len(), 1);
    assert_eq!(
        all.total,
        crate::care::UsageCounts {
            prompt_tokens: 30,
            completion_tokens: 15,
            turns: 4,
            fallbacks: 1
        }
    );
    let by_user_model = service
        .usage_report(&admin, today(), today(), "user,model".parse().unwrap())
        .await
        .unwrap();
    let rows: Vec<_> = by_user_model
        .rows
        .iter()
        .map(|r| {
            (
                r.user_id.as_ref().unwrap().as_str(),
                r.model.as_deref().unwrap(),
                r.counts.turns,
                r.counts.fallbacks,
                r.total_tokens,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("k1", "scripted", 2, 0, 30),
            ("k2", NO_MODEL, 1, 1, 0),
            ("k2", "scripted", 1, 0, 15)
        ]
    );
    let by_family = service
        .usage_report(&admin, today(), today(), "family,animal".parse().unwrap())
        .await
        .unwrap();
    assert!(
        by_family.rows.iter().any(
            |r| r.family_id.as_ref().map(FamilyId::as_str) == Some("fam1")
                && r.animal_id.as_ref() == Some(&tiger())
                && r.counts.turns == 1
        )
    );
    let csv = by_user_model.to_csv();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "day,familyId,userId,animalId,model,promptTokens,completionTokens,totalTokens,turns,fallbacks"
        )
    );
    assert_eq!(lines.next(), Some(",,k1,,scripted,20,10,30,2,0"));
    assert_eq!(lines.count(), 2);
    // Only staff read usage; ranges are bounded.
    let err = service
        .usage_report(&one, today(), today(), UsageGrouping::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "forbidden");
    let err = service
        .usage_report(
            &admin,
            today(),
            today() - chrono::TimeDelta::days(1),
            UsageGrouping::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "validation_error");
    let long = service
        .usage_report(
            &admin,
            today() - chrono::TimeDelta::days(400),
            today(),
            UsageGrouping::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        long.from,
        today() - chrono::TimeDelta::days(MAX_REPORT_DAYS - 1),
        "a long range is cut to its newest days"
    );
    assert_eq!(long.total.turns, 4);
}

#[tokio::test]
async fn feedback_is_one_vote_per_user_and_a_thumbs_down_goes_to_the_queue() {
    let care = Arc::new(InMemoryCareStore::new());
    let service = service(ScriptedModel::echo()).with_care(care.clone());
    let me = kid("k1");
    let reply = service
        .turn(&me, TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    let session = &reply.session_id;
    let answer = &reply.assistant_message.id;
    let up = service
        .give_feedback(&me, session, answer, Vote::Up, Some("  fun!  ".into()))
        .await
        .unwrap();
    assert_eq!(
        (up.vote, up.note.as_deref(), up.seq),
        (Vote::Up, Some("fun!"), 2)
    );
    assert_eq!(
        (up.persona.as_str(), up.model.as_deref()),
        ("Leo", Some("scripted"))
    );
    assert!(
        service
            .review_queue(&keeper(), ReviewState::Open, PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty(),
        "a thumbs up needs no look"
    );
    let down = service
        .give_feedback(
            &me,
            session,
            answer,
            Vote::Down,
            Some("write to my mum at mum@example.org".into()),
        )
        .await
        .unwrap();
    assert!(
        !down.note.as_deref().unwrap().contains("example.org"),
        "personal details are taken out"
    );
    assert_eq!(
        service
            .my_feedback(&me, session, answer)
            .await
            .unwrap()
            .unwrap()
            .vote,
        Vote::Down,
        "a second vote replaces the first"
    );
    let queue = service
        .review_queue(&keeper(), ReviewState::Open, PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(queue.items.len(), 1);
    assert_eq!(queue.items[0].reasons, [ReviewReason::ThumbsDown]);
    assert_eq!(&queue.items[0].message_id, answer);

    // Only replies, only in sessions the voter may read.
    let err = service
        .give_feedback(&me, session, &reply.user_message.id, Vote::Down, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "validation_error");
    let err = service
        .give_feedback(&kid("k2"), session, answer, Vote::Down, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
    let err = service
        .give_feedback(&me, session, &MessageId::generate(), Vote::Down, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
    let err = service
        .give_feedback(&me, session, answer, Vote::Down, Some("x".repeat(501)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "validation_error");
    // Without a care store, feedback is unavailable rather than lost silently.
    let bare = service_without_care();
    let reply = bare
        .turn(&me, TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    let err = bare
        .give_feedback(
            &me,
            &reply.session_id,
            &reply.assistant_message.id,
            Vote::Up,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unavailable");
}

fn service_without_care() -> ConversationService {
    service(ScriptedModel::echo())
}

#[tokio::test]
async fn staff_work_the_queue_of_fallbacks_refusals_and_redactions_and_it_is_audited() {
    let care = Arc::new(InMemoryCareStore::new());
    let audit = Arc::new(InMemoryAuditSink::new());
    let model = ScriptedModel::echo();
    let service = service(model.clone())
        .with_care(care.clone())
        .with_audit(audit.clone());
    let me = kid("k1");
    let first = service
        .turn(&me, TurnRequest::new(lion(), "hello"))
        .await
        .unwrap();
    model.push(Step::Fail(Failure::Unavailable));
    let fallback = service
        .turn(
            &me,
            TurnRequest::new(lion(), "are you there").in_session(first.session_id.clone()),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let redacted = service
        .turn(
            &me,
            TurnRequest::new(lion(), "my email is kid@example.org")
                .in_session(first.session_id.clone()),
        )
        .await
        .unwrap();
    let queue = service
        .review_queue(&keeper(), ReviewState::Open, PageRequest::first(10))
        .await
        .unwrap();
    let reasons: Vec<_> = queue
        .items
        .iter()
        .map(|i| (i.seq, i.reasons.clone()))
        .collect();
    assert_eq!(
        reasons,
        [
            (6, vec![ReviewReason::Redacted]),
            (4, vec![ReviewReason::Fallback])
        ],
        "newest first; an ordinary reply is not queued"
    );
    assert_eq!(queue.items[0].message_id, redacted.assistant_message.id);
    assert_eq!(queue.items[1].message_id, fallback.assistant_message.id);

    // Children and parents never see the queue.
    let err = service
        .review_queue(&me, ReviewState::Open, PageRequest::first(10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "forbidden");
    let err = service
        .review_item(&me, &queue.items[1].id, 2)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "forbidden");

    let opened = service
        .review_item(&keeper(), &queue.items[1].id, 1)
        .await
        .unwrap();
    assert_eq!(
        opened.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [3, 4, 5],
        "the message with one on each side"
    );
    let marked = service
        .mark_reviewed(
            &keeper(),
            &queue.items[1].id,
            Some("model outage at 10:02".into()),
        )
        .await
        .unwrap();
    assert_eq!(marked.review.as_ref().unwrap().by.as_str(), "keeper1");
    let err = service
        .mark_reviewed(&keeper(), &queue.items[1].id, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
    let err = service
        .mark_reviewed(&keeper(), "../../etc", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "validation_error");
    let reviewed = service
        .review_queue(&keeper(), ReviewState::Reviewed, PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(reviewed.items, std::slice::from_ref(&marked));
    let events: Vec<_> = audit
        .events()
        .into_iter()
        .filter(|e| e.kind == AuditKind::Review)
        .collect();
    assert_eq!(events.len(), 2, "opening and marking are audited");
    assert!(
        events
            .iter()
            .all(|e| e.subject.as_ref() == Some(&me.user_id)
                && e.actor.as_ref().map(UserId::as_str) == Some("keeper1")
                && !e.reason.contains("example.org"))
    );
}

#[tokio::test]
async fn erasing_a_user_takes_their_feedback_queue_items_and_usage() {
    let care = Arc::new(InMemoryCareStore::new());
    let model = ScriptedModel::echo();
    let service = service(model.clone()).with_care(care.clone());
    let me = kid("k1");
    let other = kid("k2");
    let reply = service
        .turn(&me, TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    service
        .give_feedback(
            &me,
            &reply.session_id,
            &reply.assistant_message.id,
            Vote::Down,
            None,
        )
        .await
        .unwrap();
    service
        .turn(&other, TurnRequest::new(lion(), "hi"))
        .await
        .unwrap();
    service
        .delete(&me, DeleteScope::User(me.user_id.clone()))
        .await
        .unwrap();
    assert!(
        care.get_feedback(&me.user_id, &reply.session_id, 2)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        care.review_items(ReviewState::Open, PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let rows = care.usage(today(), today()).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.key.user_id.as_str())
            .collect::<Vec<_>>(),
        ["k2"]
    );
}

#[tokio::test]
async fn a_running_summarys_tokens_count_in_usage_and_budgets_but_not_as_turns() {
    let care = Arc::new(InMemoryCareStore::new());
    let limits = Arc::new(InMemoryRateLimitStore::new());
    let store = Arc::new(InMemoryConversationStore::new());
    let service = ConversationService::with(
        store.clone(),
        Arc::new(InMemoryPersonaDirectory::with_personas([Persona::new(
            lion(),
            "Leo",
        )])),
        Arc::new(ScriptedModel::echo()),
        Arc::new(OwnerOrAdminPolicy),
        ConversationConfig {
            context_window: 1,
            summary_every_turns: 1,
            ..Default::default()
        },
    )
    .with_care(care.clone())
    .with_budgets(
        limits,
        Budgets {
            family: Some(1_000_000),
            ..Default::default()
        },
    );
    let me = in_family("k1", "fam1");
    let first = service
        .turn(&me, TurnRequest::new(lion(), "one"))
        .await
        .unwrap();
    for text in ["two", "three", "four"] {
        service
            .turn(
                &me,
                TurnRequest::new(lion(), text).in_session(first.session_id.clone()),
            )
            .await
            .unwrap();
        service.summaries_settled().await;
    }
    let folds = store
        .get_session(&first.session_id)
        .await
        .unwrap()
        .unwrap()
        .rolling_summary
        .expect("a running summary")
        .folds;
    assert!(folds >= 1);
    let admin = Principal::new(UserId::new("admin1").unwrap(), UserRole::Admin);
    let report = service
        .usage_report(&admin, today(), today(), UsageGrouping::default())
        .await
        .unwrap();
    assert_eq!(report.total.turns, 4, "a summary is not a turn");
    assert_eq!(
        report.total.total_tokens(),
        15 * (4 + u64::from(folds)),
        "every model call's tokens: 4 turns and {folds} summaries"
    );
    assert_eq!(
        service.budget_status(&me).await.unwrap()[0].used,
        report.total.total_tokens(),
        "the family's budget counts them too"
    );
}

/// Flags any text with "BAD" in it.
#[derive(Debug)]
struct FlagsBad;

#[async_trait::async_trait]
impl crate::moderation::Moderator for FlagsBad {
    async fn check(&self, text: &str) -> Result<crate::moderation::ModerationVerdict> {
        Ok(crate::moderation::ModerationVerdict {
            flagged: text.contains("BAD"),
            categories: vec!["harassment".into()],
        })
    }
}

#[tokio::test]
async fn a_reply_refused_at_the_strict_level_still_counts_what_the_model_spent() {
    let care = Arc::new(InMemoryCareStore::new());
    let limits = Arc::new(InMemoryRateLimitStore::new());
    let service = service(ScriptedModel::always("a BAD reply about lions"))
        .with_care(care.clone())
        .with_budgets(
            limits,
            Budgets {
                user: Some(1_000),
                family: None,
                deployment: None,
            },
        )
        .with_moderation(Arc::new(FlagsBad), Arc::new(InMemoryAuditSink::new()));
    let me = kid("k1");
    let refused = service
        .turn(
            &me,
            TurnRequest::new(lion(), "hello").with_moderation_level(ModerationLevel::Strict),
        )
        .await
        .unwrap();
    assert!(refused.moderation.flagged);
    assert!(!refused.reply.contains("BAD"));
    let admin = Principal::new(UserId::new("admin1").unwrap(), UserRole::Admin);
    let report = service
        .usage_report(&admin, today(), today(), "model".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        (report.total.prompt_tokens, report.total.completion_tokens),
        (10, 5),
        "the refused reply's tokens are counted: {report:?}"
    );
    assert_eq!(report.rows[0].model.as_deref(), Some("scripted"));
    let status = service.budget_status(&me).await.unwrap();
    assert_eq!(status[0].used, 15, "{status:?}");
}
