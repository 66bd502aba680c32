use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use async_trait::async_trait;
// foldhash: the key is a whole prompt (a kilobyte or two), hashed on every turn.
use foldhash::HashMap;
use futures::StreamExt as _;
use futures::stream::BoxStream;

use crate::chat::{ChatChunk, ChatCompletion, ChatModel, ChatRequest};
use crate::error::{Error, Result};
use crate::service::prompt::{is_persona_prompt, parse_system_prompt};
use crate::types::Role;

/// A chat model that needs no network and no LLM: it answers in character with the
/// persona's own facts, picking the fact that best matches the question.
///
/// Made for demos and local development, and labelled as such: its model name is
/// `offline-persona`, and it reports no token usage (it uses none). It only understands
/// persona prompts built by the turn engine; anything else (a summary request, say) is
/// `unavailable`, so callers fall back as they would for a model that is down.
#[derive(Debug, Clone, Copy, Default)]
pub struct OfflinePersonaModel {
    chunk_delay: std::time::Duration,
}

impl OfflinePersonaModel {
    /// The model name recorded on its replies.
    pub const NAME: &'static str = "offline-persona";

    /// A new offline model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits `delay` before each streamed word, like a model generating at that pace
    /// (for demos and load tests of long-lived streams).
    pub fn with_chunk_delay(delay: std::time::Duration) -> Self {
        Self { chunk_delay: delay }
    }

    fn reply(request: &ChatRequest) -> Result<String> {
        let card = request
            .messages
            .first()
            .filter(|m| m.role == Role::System)
            .and_then(|m| PersonaCard::of(&m.content))
            .ok_or_else(|| Error::Unavailable {
                message: "the offline persona model only answers persona conversations".into(),
                source: None,
            })?;
        let question = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map_or("", |m| m.content.as_str());
        let turn = request
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count();
        let mut reply = String::with_capacity(160);
        if !request.messages.iter().any(|m| m.role == Role::Assistant) {
            // A configured prompt (the zoo's own text) says nothing the model can read
            // back: answer without a name or facts rather than quote it.
            if card.name.is_empty() {
                reply.push_str("Hi there! ");
            } else {
                reply.push_str("Hi, I'm ");
                reply.push_str(&card.name);
                reply.push_str("! ");
            }
        }
        match card.best_fact(question, turn) {
            Some(fact) => {
                reply.push_str(fact);
                reply.push_str(" What else would you like to know?");
            }
            None => reply.push_str(
                "I love meeting visitors. Ask me anything about my life here at the zoo!",
            ),
        }
        Ok(reply)
    }
}

/// What the model reads from a persona prompt: the name and the facts, each fact with its
/// words lowercased for matching. Read once per distinct prompt (a persona's prompt is the
/// same on every turn), not on every turn.
#[derive(Debug)]
struct PersonaCard {
    name: String,
    facts: Vec<(String, Vec<String>)>,
}

/// How many distinct prompts are remembered before the cache starts over.
const CARDS_KEPT: usize = 256;

static CARDS: LazyLock<Mutex<HashMap<String, Arc<PersonaCard>>>> = LazyLock::new(Mutex::default);

impl PersonaCard {
    /// The card of `prompt`, or `None` when it is not a persona prompt.
    fn of(prompt: &str) -> Option<Arc<Self>> {
        let cards = || CARDS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(card) = cards().get(prompt) {
            return Some(Arc::clone(card));
        }
        if !is_persona_prompt(prompt) {
            return None;
        }
        let (name, facts) = parse_system_prompt(prompt).unwrap_or(("", Vec::new()));
        let card = Arc::new(Self {
            name: name.to_owned(),
            facts: facts
                .into_iter()
                .map(|fact| (fact.to_owned(), words(fact).map(lowercase).collect()))
                .collect(),
        });
        let mut cards = cards();
        if cards.len() >= CARDS_KEPT {
            cards.clear();
        }
        cards.insert(prompt.to_owned(), Arc::clone(&card));
        Some(card)
    }

    /// The fact sharing the most words with the question; with no overlap, a different
    /// fact each turn.
    fn best_fact(&self, question: &str, turn: usize) -> Option<&str> {
        if self.facts.is_empty() {
            return None;
        }
        let asked: Vec<String> = words(question).map(str::to_lowercase).collect();
        let scored = self
            .facts
            .iter()
            .enumerate()
            .map(|(i, (_, words))| (words.iter().filter(|w| asked.contains(w)).count(), i))
            .max_by_key(|&(score, i)| (score, std::cmp::Reverse(i)));
        let index = match scored {
            Some((score, i)) if score > 0 => i,
            _ => turn.saturating_sub(1) % self.facts.len(),
        };
        Some(&self.facts[index].0)
    }
}

/// The words of `text` that count for matching: four characters or more.
fn words(text: &str) -> impl Iterator<Item = &str> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().nth(3).is_some())
}

/// A fact's word lowercased character by character.
fn lowercase(word: &str) -> String {
    word.chars().flat_map(char::to_lowercase).collect()
}

#[async_trait]
impl ChatModel for OfflinePersonaModel {
    async fn complete(&self, request: ChatRequest) -> Result<ChatCompletion> {
        Ok(ChatCompletion {
            content: Self::reply(&request)?,
            usage: None,
            model: Some(Self::NAME.to_owned()),
        })
    }

    async fn stream(&self, request: ChatRequest) -> Result<BoxStream<'static, Result<ChatChunk>>> {
        // One word per chunk, cut from the reply as it is sent: an open stream holds the
        // reply once, not a chunk per word.
        let reply = Self::reply(&request)?;
        let delay = self.chunk_delay;
        let words = futures::stream::unfold(Some((reply, 0usize)), move |state| async move {
            let (reply, at) = state?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if at >= reply.len() {
                let done = ChatChunk::Done {
                    usage: None,
                    model: Some(Self::NAME.to_owned()),
                };
                return Some((Ok(done), None));
            }
            let end = reply[at..].find(' ').map_or(reply.len(), |i| at + i + 1);
            let word = ChatChunk::Delta(reply[at..end].to_owned());
            Some((Ok(word), Some((reply, end))))
        });
        Ok(words.boxed())
    }

    fn name(&self) -> &str {
        Self::NAME
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::access::{Principal, UserRole};
    use crate::ids::{AnimalId, UserId};
    use crate::memory::{InMemoryConversationStore, InMemoryPersonaDirectory};
    use crate::service::{ConversationService, TurnEvent, TurnRequest};
    use crate::types::Persona;

    #[tokio::test]
    async fn never_quotes_a_configured_prompt() {
        let leo = AnimalId::new("leo_001").unwrap();
        let mut persona = Persona::new(leo.clone(), "Leo");
        persona.system_prompt = Some(
            "You are Leo, the lion of Cougar Mountain Zoo. You are sleepy and proud.\n".into(),
        );
        let service = ConversationService::new(
            Arc::new(InMemoryConversationStore::new()),
            Arc::new(InMemoryPersonaDirectory::with_personas([persona])),
            Arc::new(OfflinePersonaModel::default()),
        );
        let kid = Principal::new(UserId::new("k1").unwrap(), UserRole::Student);
        let reply = service
            .turn(&kid, TurnRequest::new(leo, "Hello Leo! Do you nap?"))
            .await
            .unwrap();
        assert!(
            !reply.fallback,
            "the offline model answers configured animals"
        );
        for leaked in ["sleepy", "GUIDELINES", "You are"] {
            assert!(!reply.reply.contains(leaked), "{}", reply.reply);
        }
    }

    #[tokio::test]
    async fn answers_in_character_from_the_persona_facts() {
        let otter = AnimalId::new("otter").unwrap();
        let personas = InMemoryPersonaDirectory::with_personas([Persona {
            personality: "playful".into(),
            facts: vec![
                "I hold hands with my friends while I sleep.".into(),
                "I crack open clams with a rock.".into(),
            ],
            guidelines: vec![],
            ..Persona::new(otter.clone(), "Ollie")
        }]);
        let service = ConversationService::new(
            Arc::new(InMemoryConversationStore::new()),
            Arc::new(personas),
            Arc::new(OfflinePersonaModel::new()),
        );
        let me = Principal::new(UserId::new("k").unwrap(), UserRole::Student);
        let first = service
            .turn(
                &me,
                TurnRequest::new(otter.clone(), "How do you open clams?"),
            )
            .await
            .unwrap();
        assert_eq!(
            first.reply,
            "Hi, I'm Ollie! I crack open clams with a rock. What else would you like to know?"
        );
        assert_eq!(
            first.assistant_message.metadata.model.as_deref(),
            Some("offline-persona")
        );
        assert!(first.usage.is_none(), "no invented usage");
        let mut stream = service
            .stream_turn(
                &me,
                TurnRequest::new(otter, "Where do you sleep?").in_session(first.session_id.clone()),
            )
            .await
            .unwrap();
        let mut deltas = 0;
        let mut last = None;
        while let Some(event) = stream.next().await {
            match event.unwrap() {
                TurnEvent::Delta(_) => deltas += 1,
                TurnEvent::Complete(reply) => last = Some(reply),
            }
        }
        let second = last.unwrap();
        assert!(deltas > 3);
        assert_eq!(
            second.reply,
            "I hold hands with my friends while I sleep. What else would you like to know?"
        );
        // Summaries fall back to the deterministic one.
        assert!(
            service
                .summarize(&me, &first.session_id)
                .await
                .unwrap()
                .fallback
        );
    }

    /// The card of a prompt built for a persona with `facts`.
    fn card(facts: &[&str]) -> Arc<PersonaCard> {
        let persona = Persona {
            facts: facts.iter().map(|f| (*f).to_owned()).collect(),
            ..Persona::new(AnimalId::new("a").unwrap(), "Ann")
        };
        PersonaCard::of(&crate::service::prompt::system_prompt(&persona)).unwrap()
    }

    #[test]
    fn without_overlap_facts_rotate() {
        let facts = card(&["one fact", "two fact"]);
        assert_eq!(facts.best_fact("hello", 1), Some("one fact"));
        assert_eq!(facts.best_fact("hello", 2), Some("two fact"));
        assert_eq!(card(&[]).best_fact("hello", 2), None);
    }

    #[test]
    fn facts_match_whole_words_in_any_case() {
        let facts = ["Cougars sleep by day.", "Cougars EAT deer and rabbits."];
        let cougar = card(&facts);
        assert_eq!(
            cougar.best_fact("what do cougars eat? DEER?", 1),
            Some(facts[1])
        );
        assert_eq!(
            cougar.best_fact("SLEEPING?", 1),
            Some(facts[0]),
            "no shared word: rotates"
        );
        let facts = ["Ärger gibt es nie.", "Schnee überall."];
        assert_eq!(card(&facts).best_fact("ÜBERALL schnee", 1), Some(facts[1]));
    }

    #[test]
    fn a_prompt_is_read_once_and_other_prompts_are_refused() {
        let first = card(&["Otters hold hands."]);
        let again = card(&["Otters hold hands."]);
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same prompt, the same card"
        );
        assert_eq!(first.name, "Ann");
        assert!(!Arc::ptr_eq(&first, &card(&["Otters eat clams."])));
        assert!(PersonaCard::of("Summarize this conversation").is_none());
    }
}
