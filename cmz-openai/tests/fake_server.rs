//! cmz-openai against a loopback server speaking the exact Chat Completions wire format,
//! with the quirks of real servers and their faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cmz_core::Error;
use cmz_core::chat::{ChatChunk, ChatMessage, ChatModel, ChatRequest};
use cmz_core::moderation::Moderator as _;
use cmz_core::types::Role;
use cmz_openai::testing::{Behavior, FakeOpenAi, Quirks, Reply, UsageChoices};
use cmz_openai::{
    AuthStyle, CacheSettings, OpenAiChatModel, OpenAiConfig, OpenAiError, OpenAiErrorKind,
    OpenAiModerator,
};
use futures::StreamExt as _;

fn request(text: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::new(Role::System, "You are Leo."),
            ChatMessage::new(Role::User, text),
        ],
        max_tokens: Some(50),
        temperature: Some(0.3),
        model: None,
        priority: Default::default(),
    }
}

fn config(server: &FakeOpenAi) -> OpenAiConfig {
    OpenAiConfig {
        retry_base_delay: Duration::from_millis(20),
        retry_max_delay: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        ..OpenAiConfig::new(server.base_url(), "fake-gpt").with_api_key("sk-test-key")
    }
}

fn model(server: &FakeOpenAi) -> OpenAiChatModel {
    OpenAiChatModel::new(config(server)).unwrap()
}

async fn collect(model: &OpenAiChatModel, text: &str) -> (String, Vec<Result<ChatChunk, Error>>) {
    let stream = model.stream(request(text)).await.unwrap();
    let items: Vec<_> = stream.collect().await;
    let text = items
        .iter()
        .filter_map(|i| match i {
            Ok(ChatChunk::Delta(d)) => Some(d.as_str()),
            _ => None,
        })
        .collect();
    (text, items)
}

fn source_kind(error: &Error) -> Option<OpenAiErrorKind> {
    std::error::Error::source(error)?
        .downcast_ref::<OpenAiError>()
        .map(|e| e.kind)
}

#[tokio::test]
async fn a_whole_reply_with_usage_and_the_exact_request() {
    let server = FakeOpenAi::start().await;
    server.push(Behavior::Reply(
        Reply::text("Roar! I am Leo.").with_cached_usage(42, 6, 32),
    ));
    let config = OpenAiConfig {
        organization: Some("org-zoo".into()),
        project: Some("proj-1".into()),
        ..config(&server)
    };
    let model = OpenAiChatModel::new(config).unwrap();
    let reply = model.complete(request("hi")).await.unwrap();
    assert_eq!(reply.content, "Roar! I am Leo.");
    let usage = reply.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_prompt_tokens
        ),
        (42, 6, Some(32))
    );
    assert_eq!(reply.model.as_deref(), Some("fake-gpt"));
    let sent = &server.requests()[0];
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some("Bearer sk-test-key"));
    assert_eq!(sent.header("openai-organization"), Some("org-zoo"));
    assert_eq!(sent.header("openai-project"), Some("proj-1"));
    assert_eq!(sent.body["model"], "fake-gpt");
    assert_eq!(sent.body["stream"], false);
    assert_eq!(sent.body["max_tokens"], 50);
    assert!((sent.body["temperature"].as_f64().unwrap() - 0.3).abs() < 1e-6);
    assert_eq!(
        sent.body["messages"][0],
        serde_json::json!({"role": "system", "content": "You are Leo."})
    );
    assert_eq!(
        sent.body["messages"][1],
        serde_json::json!({"role": "user", "content": "hi"})
    );
    assert!(sent.body.get("stream_options").is_none());
}

#[tokio::test]
async fn streams_parse_whatever_framing_real_servers_use() {
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    let variants = [
        Quirks::default(),
        Quirks {
            crlf: true,
            ..Quirks::default()
        },
        Quirks {
            no_space_after_data: true,
            ..Quirks::default()
        },
        Quirks {
            keepalive_comments: true,
            ..Quirks::default()
        },
        Quirks {
            usage_choices: UsageChoices::Absent,
            ..Quirks::default()
        },
        Quirks {
            usage_choices: UsageChoices::EmptyDelta,
            ..Quirks::default()
        },
        Quirks {
            role_only_first_chunk: false,
            ..Quirks::default()
        },
        // No [DONE]: the stream simply ends after the finish chunk and the usage.
        Quirks {
            send_done: false,
            ..Quirks::default()
        },
        // No finish_reason, but [DONE].
        Quirks {
            finish_reason: false,
            ..Quirks::default()
        },
        Quirks {
            crlf: true,
            no_space_after_data: true,
            keepalive_comments: true,
            usage_choices: UsageChoices::EmptyDelta,
            role_only_first_chunk: false,
            finish_reason: true,
            send_done: false,
        },
    ];
    for quirks in variants {
        server.push(Behavior::Reply(
            Reply::text("Lions sleep twenty hours a day.")
                .with_usage(30, 7)
                .with_quirks(quirks),
        ));
        let (text, items) = collect(&model, "sleep?").await;
        assert_eq!(text, "Lions sleep twenty hours a day.", "{quirks:?}");
        match items.last() {
            Some(Ok(ChatChunk::Done {
                usage: Some(usage), ..
            })) => assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens),
                (30, 7),
                "{quirks:?}"
            ),
            other => panic!("{quirks:?}: {other:?}"),
        }
        assert_eq!(
            items
                .iter()
                .filter(|i| matches!(i, Ok(ChatChunk::Done { .. })))
                .count(),
            1
        );
    }
    let sent = server.requests().pop().unwrap();
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["stream_options"]["include_usage"], true);
    assert_eq!(sent.header("accept"), Some("text/event-stream"));
    // No usage sent: none reported, never invented.
    server.push(Behavior::Reply(Reply::text("Hi.").without_usage()));
    let (_, items) = collect(&model, "hi").await;
    assert!(matches!(
        items.last(),
        Some(Ok(ChatChunk::Done { usage: None, .. }))
    ));
    server.push(Behavior::Reply(Reply::text("Hi.").without_usage()));
    assert!(model.complete(request("hi")).await.unwrap().usage.is_none());
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_with_the_servers_delay() {
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    server.push(Behavior::status(429, Some("1")));
    server.push(Behavior::Reply(Reply::text("Finally.")));
    let started = Instant::now();
    assert_eq!(
        model.complete(request("hi")).await.unwrap().content,
        "Finally."
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "retry-after: 1 was honoured ({:?})",
        started.elapsed()
    );
    assert_eq!(server.requests().len(), 2);

    server.push(Behavior::Error {
        status: 503,
        body: "{}".into(),
        headers: vec![("retry-after-ms".into(), "120".into())],
    });
    server.push(Behavior::status(500, None));
    server.push(Behavior::Reply(Reply::text("Third time.")));
    let (text, _) = collect(&model, "hi").await;
    assert_eq!(text, "Third time.", "streams retry before their first byte");
    assert_eq!(server.requests().len(), 5);

    // Always failing: max_retries (2) retries, then unavailable with the server's error kept.
    server.set_default(Behavior::status(500, None));
    let err = model.complete(request("hi")).await.unwrap_err();
    assert_eq!(err.code(), "unavailable");
    assert_eq!(source_kind(&err), Some(OpenAiErrorKind::Server));
    assert_eq!(server.requests().len(), 8);

    // A retry-after longer than we are willing to wait: no retry, a clear rate limit.
    server.set_default(Behavior::status(429, Some("120")));
    let err = model.complete(request("hi")).await.unwrap_err();
    assert_eq!(err.code(), "rate_limit_exceeded");
    let Error::RateLimited {
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!()
    };
    assert!(wait >= Duration::from_secs(119));
    assert_eq!(server.requests().len(), 9);
}

#[tokio::test]
async fn client_errors_are_not_retried_and_map_to_codes() {
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    server.push(Behavior::status(401, None));
    let err = model.complete(request("hi")).await.unwrap_err();
    assert_eq!(err.code(), "unavailable");
    assert_eq!(source_kind(&err), Some(OpenAiErrorKind::Authentication));
    assert!(!err.to_string().contains("sk-test-key"), "{err}");
    server.push(Behavior::status(400, None));
    assert_eq!(
        model.complete(request("hi")).await.unwrap_err().code(),
        "validation_error",
        "context length"
    );
    server.push(Behavior::Malformed);
    let err = model.complete(request("hi")).await.unwrap_err();
    assert_eq!(
        (err.code().as_str(), source_kind(&err)),
        ("unavailable", Some(OpenAiErrorKind::Decode))
    );
    server.push(Behavior::Malformed);
    let (_, items) = collect(&model, "hi").await;
    assert_eq!(
        items.last().unwrap().as_ref().unwrap_err().code(),
        "unavailable"
    );
    assert_eq!(server.requests().len(), 4, "no retries");
}

#[tokio::test]
async fn a_stream_cut_midway_is_an_error_after_the_text_so_far_and_is_not_retried() {
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    server.push(Behavior::CutAfter(
        Reply::text("one two three four five"),
        2,
    ));
    let (text, items) = collect(&model, "count").await;
    assert_eq!(text, "one two ");
    let err = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(err.code(), "unavailable");
    assert_eq!(source_kind(err), Some(OpenAiErrorKind::StreamCut));
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_slow_server_times_out() {
    let server = FakeOpenAi::start().await;
    let config = OpenAiConfig {
        request_timeout: Duration::from_millis(300),
        max_retries: 0,
        ..config(&server)
    };
    let model = OpenAiChatModel::new(config).unwrap();
    server.push(Behavior::Hang);
    let started = Instant::now();
    let err = model.complete(request("hi")).await.unwrap_err();
    assert_eq!(err.code(), "timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    server.push(Behavior::Hang);
    let Err(err) = model.stream(request("hi")).await else {
        panic!("expected a timeout")
    };
    assert_eq!(err.code(), "timeout");
}

#[tokio::test]
async fn dropping_a_stream_closes_the_connection() {
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    // A stream that never sends [DONE] and then goes quiet.
    server.push(Behavior::Stall(Reply::text("a b c d e f"), 2));
    let mut stream = model.stream(request("hi")).await.unwrap();
    assert!(matches!(stream.next().await, Some(Ok(ChatChunk::Delta(_)))));
    assert!(matches!(stream.next().await, Some(Ok(ChatChunk::Delta(_)))));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.next())
            .await
            .is_err(),
        "the server went quiet"
    );
    assert_eq!(server.disconnects(), 0);
    drop(stream);
    assert!(
        server.wait_for_disconnects(1, Duration::from_secs(5)).await,
        "the server saw the connection close"
    );
}

#[tokio::test]
async fn a_full_queue_fails_at_once() {
    let server = FakeOpenAi::start().await;
    let config = OpenAiConfig {
        max_concurrency: 1,
        max_queue: 0,
        ..config(&server)
    };
    let model = OpenAiChatModel::new(config).unwrap();
    server.push(Behavior::Stall(Reply::text("x y z"), 1));
    let held = model.stream(request("hold")).await.unwrap();
    let started = Instant::now();
    let err = model.complete(request("hi")).await.unwrap_err();
    assert_eq!(err.code(), "rate_limit_exceeded");
    assert!(err.to_string().contains("queue is full"), "{err}");
    assert!(started.elapsed() < Duration::from_millis(500));
    drop(held);
    server.push(Behavior::Reply(Reply::text("free again")));
    assert_eq!(
        model.complete(request("hi")).await.unwrap().content,
        "free again"
    );
}

#[tokio::test]
async fn the_cache_is_off_by_default_and_serves_identical_requests_when_on() {
    let server = FakeOpenAi::start().await;
    let plain = model(&server);
    plain.complete(request("same")).await.unwrap();
    plain.complete(request("same")).await.unwrap();
    assert_eq!(server.requests().len(), 2);
    let cached = OpenAiChatModel::new(OpenAiConfig {
        cache: Some(CacheSettings {
            capacity: 100,
            ttl: Duration::from_secs(60),
        }),
        ..config(&server)
    })
    .unwrap();
    let a = cached.complete(request("same")).await.unwrap();
    let b = cached.complete(request("same")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(server.requests().len(), 3);
    cached.complete(request("different")).await.unwrap();
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn health_moderation_and_azure_style() {
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    assert_eq!(model.health().await.unwrap().model, "fake-gpt");
    let wrong = OpenAiChatModel::new(OpenAiConfig {
        api_key: Some(cmz_openai::ApiKey::new("wrong-key")),
        ..config(&server)
    })
    .unwrap();
    assert_eq!(wrong.health().await.unwrap_err().code(), "unavailable");

    let moderator = OpenAiModerator::new(model.clone());
    let verdict = moderator.check("you are FLAGGED").await.unwrap();
    assert!(verdict.flagged);
    assert_eq!(verdict.categories, vec!["violence".to_owned()]);
    assert!(!moderator.check("what do lions eat?").await.unwrap().flagged);
    let sent = server
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path == "/v1/moderations")
        .unwrap();
    assert_eq!(sent.body["model"], "omni-moderation-latest");

    let azure = OpenAiChatModel::new(OpenAiConfig {
        auth: AuthStyle::Azure {
            api_version: "2024-10-21".into(),
        },
        ..config(&server)
    })
    .unwrap();
    // The fake server ignores the query string; the headers show the Azure style.
    azure.complete(request("hi")).await.unwrap();
    let sent = server.requests().pop().unwrap();
    assert_eq!(sent.header("api-key"), Some("sk-test-key"));
    assert!(sent.header("authorization").is_none());
}

#[tokio::test]
async fn turns_through_the_conversation_service_store_the_servers_usage() {
    use cmz_core::prelude::*;
    let server = FakeOpenAi::start().await;
    let model = Arc::new(model(&server));
    let lion = AnimalId::new("lion").unwrap();
    let personas = InMemoryPersonaDirectory::with_personas([Persona {
        personality: "proud".into(),
        facts: vec!["I sleep a lot.".into()],
        guidelines: vec![],
        ..Persona::new(lion.clone(), "Leo")
    }]);
    let service = ConversationService::new(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(personas),
        model,
    );
    let me = Principal::new(UserId::new("kid1").unwrap(), UserRole::Student);
    server.push(Behavior::Reply(
        Reply::text("Roar, hello!").with_cached_usage(120, 4, 64),
    ));
    let reply = service
        .turn(&me, TurnRequest::new(lion.clone(), "Hi Leo"))
        .await
        .unwrap();
    assert_eq!(reply.reply, "Roar, hello!");
    let meta = &reply.assistant_message.metadata;
    assert_eq!(
        (
            meta.tokens_prompt,
            meta.tokens_completion,
            meta.tokens_cached
        ),
        (Some(120), Some(4), Some(64))
    );
    assert_eq!(meta.model.as_deref(), Some("fake-gpt"));
    let prompt = &server.requests()[0].body["messages"];
    assert!(
        prompt[0]["content"]
            .as_str()
            .unwrap()
            .starts_with("You are Leo")
    );

    server.push(Behavior::Reply(
        Reply::text("I nap all day.").with_usage(150, 5),
    ));
    let mut stream = service
        .stream_turn(
            &me,
            TurnRequest::new(lion.clone(), "Do you sleep?").in_session(reply.session_id.clone()),
        )
        .await
        .unwrap();
    let mut complete = None;
    while let Some(event) = stream.next().await {
        if let TurnEvent::Complete(done) = event.unwrap() {
            complete = Some(done);
        }
    }
    let streamed = complete.unwrap();
    assert_eq!(streamed.reply, "I nap all day.");
    assert_eq!(
        streamed
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((150, 5))
    );
    let history = &server.requests()[1].body["messages"];
    assert_eq!(
        history.as_array().unwrap().len(),
        4,
        "system, the first turn, the new message"
    );

    // A client that goes away mid-stream: the model request is closed, the partial reply kept.
    server.push(Behavior::Stall(
        Reply::text("Let me tell you a long story"),
        2,
    ));
    let mut stream = service
        .stream_turn(
            &me,
            TurnRequest::new(lion, "Story?").in_session(reply.session_id.clone()),
        )
        .await
        .unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    assert!(server.wait_for_disconnects(1, Duration::from_secs(5)).await);
    let mut stored = Vec::new();
    for _ in 0..100 {
        stored = service
            .history(&me, &reply.session_id, PageRequest::first(50))
            .await
            .unwrap()
            .items;
        if stored.len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored.len(), 6);
    assert!(stored[5].metadata.interrupted);
    assert!(
        stored[5].content.starts_with("Let "),
        "{:?}",
        stored[5].content
    );
}

#[tokio::test]
async fn a_request_waiting_to_retry_gives_its_queue_slot_back() {
    let server = FakeOpenAi::start().await;
    let config = OpenAiConfig {
        max_concurrency: 1,
        max_queue: 0,
        ..config(&server)
    };
    let model = OpenAiChatModel::new(config).unwrap();
    server.push(Behavior::status(429, Some("1")));
    server.push(Behavior::Reply(Reply::text("B got through")));
    let waiting = {
        let model = model.clone();
        tokio::spawn(async move { model.complete(request("A")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A sleeps out its retry-after: its slot is free, so B is served at once.
    let started = Instant::now();
    assert_eq!(
        model.complete(request("B")).await.unwrap().content,
        "B got through"
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(waiting.await.unwrap().unwrap().content, "echo: A");
}

#[tokio::test]
async fn the_openai_model_meets_the_chat_model_contract() {
    use cmz_core::testing::{
        check_chat_model_answers, check_chat_model_drop_cancels,
        check_chat_model_failure_ends_the_stream,
    };
    let server = FakeOpenAi::start().await;
    let model = model(&server);
    check_chat_model_answers(&model, request("hi")).await;
    server.push(Behavior::CutAfter(Reply::text("a b c d e f"), 2));
    check_chat_model_failure_ends_the_stream(&model, request("hi")).await;
    server.push(Behavior::Malformed);
    check_chat_model_failure_ends_the_stream(&model, request("hi")).await;
    server.push(Behavior::Reply(
        Reply::text("a long story about lions and their naps")
            .with_chunk_delay(Duration::from_millis(50)),
    ));
    let before = server.disconnects();
    let watched = &server;
    check_chat_model_drop_cancels(&model, request("hi"), || async move {
        watched
            .wait_for_disconnects(before + 1, Duration::from_secs(5))
            .await
    })
    .await;
}
