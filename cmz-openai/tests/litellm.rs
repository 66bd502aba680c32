//! End to end against a real third-party OpenAI-compatible server run offline: LiteLLM
//! proxy with mock models, started by `.ci/run` (`CMZ_LITELLM_URL`, `CMZ_LITELLM_KEY`;
//! config in `.ci/litellm.yaml`). These tests fail, never skip, when the server is not
//! there.

use std::sync::Arc;
use std::time::Duration;

use cmz_core::chat::{ChatChunk, ChatMessage, ChatModel, ChatRequest};
use cmz_core::prelude::*;
use cmz_core::service::prompt::system_prompt;
use cmz_openai::{OpenAiChatModel, OpenAiConfig};
use futures::StreamExt as _;

fn server() -> (String, String) {
    let url = std::env::var("CMZ_LITELLM_URL").expect(
        "CMZ_LITELLM_URL is not set: run `bash .ci/run`, which starts LiteLLM proxy (pip install 'litellm[proxy]') with .ci/litellm.yaml",
    );
    let key = std::env::var("CMZ_LITELLM_KEY")
        .expect("CMZ_LITELLM_KEY (the proxy's master key) is not set");
    (url, key)
}

fn model(name: &str) -> OpenAiChatModel {
    let (url, key) = server();
    OpenAiChatModel::new(OpenAiConfig {
        max_retries: 1,
        retry_base_delay: Duration::from_millis(50),
        ..OpenAiConfig::new(url, name).with_api_key(key)
    })
    .unwrap()
}

/// What the server itself sends for this body: the usage of a plain HTTP call.
async fn raw_usage(body: serde_json::Value) -> (u64, u64) {
    let (url, key) = server();
    let stream = body["stream"].as_bool().unwrap_or(false);
    let text = reqwest::Client::new()
        .post(format!("{url}/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage = if stream {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d.trim()).ok())
            .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
            .expect("a usage chunk")
    } else {
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["usage"].clone()
    };
    (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    )
}

fn lion() -> Persona {
    Persona {
        personality: "proud".into(),
        facts: vec!["I sleep twenty hours a day.".into()],
        guidelines: vec![],
        ..Persona::new(AnimalId::new("lion").unwrap(), "Leo")
    }
}

#[tokio::test]
async fn whole_and_streamed_replies_from_litellm() {
    let model = model("gpt-4o-mini");
    let request = ChatRequest {
        messages: vec![ChatMessage::new(Role::User, "hi there")],
        ..Default::default()
    };
    let reply = model.complete(request.clone()).await.unwrap();
    assert_eq!(reply.content, "Hello from the mock");
    assert!(
        reply
            .usage
            .is_some_and(|u| u.prompt_tokens > 0 && u.completion_tokens > 0)
    );
    let items: Vec<_> = model.stream(request).await.unwrap().collect().await;
    let text: String = items
        .iter()
        .filter_map(|i| match i {
            Ok(ChatChunk::Delta(d)) => Some(d.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "Hello from the mock");
    assert!(items.len() > 3, "several deltas");
    assert!(
        matches!(
            items.last(),
            Some(Ok(ChatChunk::Done { usage: Some(_), .. }))
        ),
        "{:?}",
        items.last()
    );
    model.health().await.unwrap();
}

#[tokio::test]
async fn turns_through_the_service_store_the_usage_litellm_sent() {
    let persona = lion();
    let service = ConversationService::new(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(InMemoryPersonaDirectory::with_personas([persona.clone()])),
        Arc::new(model("gpt-4o-mini")),
    );
    let me = Principal::new(UserId::new("kid1").unwrap(), UserRole::Student);
    let reply = service
        .turn(&me, TurnRequest::new(persona.animal_id.clone(), "Hi Leo"))
        .await
        .unwrap();
    assert_eq!(reply.reply, "Hello from the mock");
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": system_prompt(&persona)}, {"role": "user", "content": "Hi Leo"}],
        "max_tokens": 300,
    });
    let (prompt, completion) = raw_usage(body.clone()).await;
    let meta = &reply.assistant_message.metadata;
    assert_eq!(
        (meta.tokens_prompt, meta.tokens_completion),
        (Some(prompt as u32), Some(completion as u32))
    );

    // A streamed first turn in a new session sends the same prompt.
    let mut stream = service
        .stream_turn(&me, TurnRequest::new(persona.animal_id.clone(), "Hi Leo"))
        .await
        .unwrap();
    let mut complete = None;
    while let Some(event) = stream.next().await {
        if let TurnEvent::Complete(done) = event.unwrap() {
            complete = Some(done);
        }
    }
    let streamed = complete.expect("a complete event");
    assert_eq!(streamed.reply, "Hello from the mock");
    let mut stream_body = body;
    stream_body["stream"] = true.into();
    stream_body["stream_options"] = serde_json::json!({"include_usage": true});
    let (prompt, completion) = raw_usage(stream_body).await;
    let usage = streamed.usage.expect("usage from the stream");
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (prompt as u32, completion as u32)
    );
    let history = service
        .history(&me, &streamed.session_id, PageRequest::first(10))
        .await
        .unwrap();
    assert_eq!(
        history.items[1].metadata.tokens_completion,
        Some(completion as u32)
    );
}

#[tokio::test]
async fn litellm_faults_map_to_codes() {
    let err = model("rate-limited")
        .complete(ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "x")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "rate_limit_exceeded", "{err:?}");
    let err = model("broken")
        .complete(ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "x")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "unavailable", "{err:?}");
    let (url, _) = server();
    let wrong = OpenAiChatModel::new(OpenAiConfig {
        max_retries: 0,
        ..OpenAiConfig::new(url, "gpt-4o-mini").with_api_key("sk-wrong")
    })
    .unwrap();
    let err = wrong
        .complete(ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "x")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code().as_str(), "unavailable" | "internal_error"),
        "{err:?}"
    );
}
