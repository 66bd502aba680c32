//! Conformance checks for [`ChatModel`] and [`PersonaDirectory`] backends: the contracts
//! their trait docs state, checked the same way for every implementation.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;

use crate::chat::{ChatChunk, ChatModel, ChatRequest};
use crate::ids::AnimalId;
use crate::persona::{PersonaDirectory, PersonaDirectoryExt as _};
use crate::types::Persona;

/// Checks a model that answers `request`: `complete` gives a non-empty reply, and `stream`
/// gives deltas followed by exactly one [`ChatChunk::Done`], the last item, with no error.
pub async fn check_chat_model_answers(model: &dyn ChatModel, request: ChatRequest) {
    let whole = model
        .complete(request.clone())
        .await
        .expect("contract: complete answers");
    assert!(
        !whole.content.trim().is_empty(),
        "contract: a completed reply has text"
    );
    let items: Vec<_> = model
        .stream(request)
        .await
        .expect("contract: stream opens")
        .collect()
        .await;
    let dones = items
        .iter()
        .filter(|item| matches!(item, Ok(ChatChunk::Done { .. })))
        .count();
    assert_eq!(dones, 1, "contract: exactly one Done: {items:?}");
    assert!(
        matches!(items.last(), Some(Ok(ChatChunk::Done { .. }))),
        "contract: Done is the last item: {items:?}"
    );
    assert!(
        items.iter().all(Result::is_ok),
        "contract: no error in an answered stream: {items:?}"
    );
    let text: String = items
        .iter()
        .filter_map(|item| match item {
            Ok(ChatChunk::Delta(delta)) => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        !text.trim().is_empty(),
        "contract: a streamed reply has text"
    );
}

/// Checks a model arranged (by the caller) to fail on `request`: either `stream` itself
/// fails, or the stream ends at its first error, with no `Done` before or after it.
pub async fn check_chat_model_failure_ends_the_stream(model: &dyn ChatModel, request: ChatRequest) {
    let Ok(mut stream) = model.stream(request).await else {
        return;
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Err(_) => panic!("contract: a failing stream ends (it hung)"),
            Ok(None) => panic!("contract: a failing stream ends with an error, not silently"),
            Ok(Some(Ok(ChatChunk::Done { .. }))) => {
                panic!("contract: a failing stream has no Done")
            }
            Ok(Some(Ok(ChatChunk::Delta(_)))) => {}
            Ok(Some(Err(_))) => break,
        }
    }
    let after = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    assert!(
        matches!(after, Ok(None)),
        "contract: nothing follows the error: {after:?}"
    );
}

/// Checks that dropping a stream after its first delta cancels the model's work:
/// `cancelled` resolves to whether the backend saw the cancellation (a closed upstream
/// connection, a counter), given up to a few seconds.
pub async fn check_chat_model_drop_cancels<F, Fut>(
    model: &dyn ChatModel,
    request: ChatRequest,
    cancelled: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut stream = model.stream(request).await.expect("contract: stream opens");
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("contract: the first item arrives");
    assert!(
        matches!(first, Some(Ok(ChatChunk::Delta(_)))),
        "a long reply starts with a delta: {first:?}"
    );
    drop(stream);
    assert!(
        cancelled().await,
        "contract: dropping the stream cancels the model's work"
    );
}

/// Checks a persona directory that holds exactly `expected` (offered or not):
/// `persona` finds each and gives `None` (not an error) for an unknown animal, `list`
/// returns them all ordered by animal id, and `require` offers only offered ones.
pub async fn check_persona_directory(directory: &dyn PersonaDirectory, expected: &[Persona]) {
    for persona in expected {
        let found = directory
            .persona(&persona.animal_id)
            .await
            .expect("contract: persona reads");
        assert_eq!(
            found.as_ref(),
            Some(persona),
            "contract: persona {} reads back",
            persona.animal_id
        );
        let required = directory.require(&persona.animal_id).await;
        if persona.is_offered() {
            assert_eq!(required.expect("offered").animal_id, persona.animal_id);
        } else {
            assert_eq!(
                required.expect_err("contract: not offered").code(),
                "not_found"
            );
        }
    }
    let unknown = AnimalId::new("no_such_animal_zz").expect("id");
    assert_eq!(
        directory
            .persona(&unknown)
            .await
            .expect("contract: unknown is None"),
        None
    );
    assert_eq!(
        directory
            .require(&unknown)
            .await
            .expect_err("unknown")
            .code(),
        "not_found"
    );
    let listed = directory.list().await.expect("contract: list reads");
    let ids: Vec<_> = listed.iter().map(|p| p.animal_id.clone()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "contract: list is ordered by animal id");
    let mut want: Vec<_> = expected.iter().map(|p| p.animal_id.clone()).collect();
    want.sort();
    assert_eq!(ids, want, "contract: list returns every persona");
    let offered: Vec<_> = directory
        .offered()
        .await
        .expect("offered")
        .into_iter()
        .map(|p| p.animal_id)
        .collect();
    let want_offered: Vec<_> = listed
        .iter()
        .filter(|p| p.is_offered())
        .map(|p| p.animal_id.clone())
        .collect();
    assert_eq!(offered, want_offered);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatMessage;
    use crate::memory::{InMemoryPersonaDirectory, OfflinePersonaModel};
    use crate::service::prompt::system_prompt;
    use crate::testing::{Failure, ScriptedModel, Step};
    use crate::types::{AnimalStatus, Role};

    fn request(persona: &Persona, text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![
                ChatMessage::new(Role::System, system_prompt(persona)),
                ChatMessage::new(Role::User, text),
            ],
            ..ChatRequest::default()
        }
    }

    fn leo() -> Persona {
        Persona {
            facts: vec!["Lions sleep twenty hours a day.".into()],
            ..Persona::new(AnimalId::new("lion").unwrap(), "Leo")
        }
    }

    #[tokio::test]
    async fn the_scripted_model_meets_the_contract() {
        let model = ScriptedModel::echo().with_chunk_delay(Duration::from_millis(20));
        check_chat_model_answers(&model, request(&leo(), "hello there")).await;
        model.push(Step::Fail(Failure::CutAfter(1)));
        check_chat_model_failure_ends_the_stream(&model, request(&leo(), "hello there")).await;
        model.push(Step::Fail(Failure::Unavailable));
        check_chat_model_failure_ends_the_stream(&model, request(&leo(), "hello")).await;
        let watched = model.clone();
        check_chat_model_drop_cancels(
            &model,
            request(&leo(), "tell me a long story about the savanna please"),
            || async move {
                for _ in 0..100 {
                    if watched.streams_dropped_early() > 0 {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            },
        )
        .await;
    }

    #[tokio::test]
    async fn the_offline_model_meets_the_contract() {
        let model = OfflinePersonaModel::default();
        check_chat_model_answers(&model, request(&leo(), "Do you sleep a lot?")).await;
        // It only answers persona conversations; anything else fails the same way.
        let plain = ChatRequest {
            messages: vec![ChatMessage::new(Role::User, "hi")],
            ..ChatRequest::default()
        };
        check_chat_model_failure_ends_the_stream(&model, plain).await;
    }

    #[tokio::test]
    async fn the_in_memory_persona_directory_meets_the_contract() {
        let mut hidden = Persona::new(AnimalId::new("bella_002").unwrap(), "Bella");
        hidden.status = AnimalStatus::Hidden;
        let expected = [
            leo(),
            hidden,
            Persona::new(AnimalId::new("charlie_003").unwrap(), "Charlie"),
        ];
        let directory = InMemoryPersonaDirectory::with_personas(expected.clone());
        check_persona_directory(&directory, &expected).await;
    }
}
