//! Support for cmz's benchmarks (the `[[bench]]` targets of this package; see `README.md`).
//!
//! Holds the alternatives the benchmarks compare cmz with, so each benchmark measures both
//! in the same run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cmz_core::chat::{ChatCompletion, ChatModel, ChatRequest};
use cmz_core::prelude::*;
use cmz_core::store::{AppendOutcome, TurnAppend};
use serde::{Deserialize, Serialize};

/// A chat model that answers at once with a fixed reply and usage, so a benchmark
/// measures the engine and the store, not the model.
#[derive(Debug, Default, Clone, Copy)]
pub struct InstantModel;

#[async_trait]
impl ChatModel for InstantModel {
    async fn complete(&self, _request: ChatRequest) -> Result<ChatCompletion> {
        Ok(ChatCompletion {
            content: "Roar! Lions sleep up to twenty hours a day.".into(),
            usage: Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 12,
                cached_prompt_tokens: None,
            }),
            model: None,
        })
    }

    fn name(&self) -> &str {
        "instant"
    }
}

/// The legacy layout, in memory: each conversation is ONE serialized document holding all
/// of its messages, read whole and rewritten whole on every turn (as the legacy stack's
/// single DynamoDB item with `list_append`). The alternative cmz's per-message layout
/// replaces.
#[derive(Debug, Default)]
pub struct LegacyDocumentStore {
    documents: Mutex<HashMap<SessionId, String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LegacyDocument {
    session: Session,
    messages: Vec<Message>,
    turn_keys: HashMap<String, (usize, usize)>,
}

impl LegacyDocumentStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn load(&self, id: &SessionId) -> Result<Option<LegacyDocument>> {
        let documents = self.documents.lock().unwrap_or_else(|p| p.into_inner());
        documents
            .get(id)
            .map(|json| serde_json::from_str(json).map_err(|e| Error::unavailable("decode", e)))
            .transpose()
    }

    fn save(&self, document: &LegacyDocument) -> Result<()> {
        let json = serde_json::to_string(document).map_err(|e| Error::unavailable("encode", e))?;
        self.documents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(document.session.id.clone(), json);
        Ok(())
    }

    fn require(&self, id: &SessionId) -> Result<LegacyDocument> {
        self.load(id)?
            .ok_or_else(|| Error::not_found(format!("session {id}")))
    }
}

#[async_trait]
impl ConversationStore for LegacyDocumentStore {
    async fn create_session(&self, session: &Session) -> Result<()> {
        if self.load(&session.id)?.is_some() {
            return Err(Error::conflict("exists"));
        }
        self.save(&LegacyDocument {
            session: session.clone(),
            messages: Vec::new(),
            turn_keys: HashMap::new(),
        })
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        Ok(self.load(id)?.map(|d| d.session))
    }

    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome> {
        if let Some(session) = &append.new_session {
            if self.load(&session.id)?.is_none() {
                self.create_session(session).await?;
            }
        }
        let mut document = self.require(&append.session_id)?;
        if let Some(&(start, len)) = append
            .turn_key
            .as_ref()
            .and_then(|k| document.turn_keys.get(k))
        {
            return Ok(AppendOutcome::Duplicate(
                document.messages[start..start + len].to_vec(),
            ));
        }
        if document.session.message_count != append.expected_count {
            return Err(Error::conflict("sequence"));
        }
        let start = document.messages.len();
        for message in append.messages {
            message.validate()?;
            let seq = document.messages.len() as u64 + 1;
            document
                .messages
                .push(message.into_message(append.session_id.clone(), seq));
        }
        document.session.message_count = document.messages.len() as u64;
        let stored = document.messages[start..].to_vec();
        if let Some(key) = append.turn_key {
            document.turn_keys.insert(key, (start, stored.len()));
        }
        self.save(&document)?;
        Ok(AppendOutcome::Appended(stored))
    }

    async fn find_turn(&self, id: &SessionId, key: &str) -> Result<Option<Vec<Message>>> {
        let document = self.require(id)?;
        Ok(document
            .turn_keys
            .get(key)
            .map(|&(start, len)| document.messages[start..start + len].to_vec()))
    }

    async fn recent_messages(&self, id: &SessionId, limit: usize) -> Result<Vec<Message>> {
        let document = self.require(id)?;
        let start = document.messages.len().saturating_sub(limit);
        Ok(document.messages[start..].to_vec())
    }

    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>> {
        let document = self.require(id)?;
        let limit = page.effective_limit();
        Ok(Page {
            items: document.messages.into_iter().take(limit).collect(),
            next: None,
        })
    }

    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>> {
        let documents: Vec<String> = self
            .documents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut sessions = Vec::new();
        for json in documents {
            let document: LegacyDocument =
                serde_json::from_str(&json).map_err(|e| Error::unavailable("decode", e))?;
            let keep = match &scope {
                SessionScope::User(user) => &document.session.user_id == user,
                SessionScope::Animal(animal) => &document.session.animal_id == animal,
            };
            if keep {
                sessions.push(document.session);
            }
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.last_activity));
        sessions.truncate(page.effective_limit());
        Ok(Page {
            items: sessions,
            next: None,
        })
    }

    async fn messages_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let document = self.require(id)?;
        Ok(document
            .messages
            .into_iter()
            .filter(|m| m.seq > after)
            .take(limit)
            .collect())
    }

    async fn set_rolling_summary(
        &self,
        id: &SessionId,
        summary: &cmz_core::types::RollingSummary,
    ) -> Result<bool> {
        let mut document = self.require(id)?;
        if document
            .session
            .rolling_summary
            .as_ref()
            .is_some_and(|s| s.through >= summary.through)
        {
            return Ok(false);
        }
        document.session.rolling_summary = Some(summary.clone());
        self.save(&document).map(|()| true)
    }

    async fn set_summary(&self, id: &SessionId, summary: &str) -> Result<()> {
        let mut document = self.require(id)?;
        document.session.summary = Some(summary.to_owned());
        self.save(&document)
    }

    async fn set_thread_id(&self, id: &SessionId, thread_id: &str) -> Result<()> {
        let mut document = self.require(id)?;
        document.session.thread_id = Some(thread_id.to_owned());
        self.save(&document)
    }

    async fn delete(&self, scope: DeleteScope) -> Result<DeleteReport> {
        let mut report = DeleteReport::default();
        if let DeleteScope::Session(id) = scope {
            if let Some(document) = self.load(&id)? {
                self.documents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                report.sessions = 1;
                report.messages = document.messages.len() as u64;
            }
        }
        Ok(report)
    }
}

/// The runtime the benchmarks run on: two worker threads (the machine's cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A Redis for a benchmark: `CMZ_TEST_REDIS_URL`'s, or a `redis-server` started here (kept
/// running as long as the returned guard).
pub fn redis_url() -> (Option<cmz_redis::testing::RedisServer>, String) {
    match std::env::var("CMZ_TEST_REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = cmz_redis::testing::RedisServer::start();
            let url = server.url();
            (Some(server), url)
        }
    }
}

/// The median of `samples` (the upper one of the middle two for an even count).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// The animal the benchmarks talk to.
pub fn bench_animal() -> AnimalId {
    AnimalId::new("lion").expect("valid id")
}

/// A persona directory with the benchmark's lion.
pub fn bench_personas() -> InMemoryPersonaDirectory {
    InMemoryPersonaDirectory::with_personas([Persona {
        personality: "proud, warm and a little sleepy".into(),
        facts: vec![
            "Lions sleep up to 20 hours a day.".into(),
            "A lion's roar can be heard 8 kilometres away.".into(),
        ],
        guidelines: vec![],
        ..Persona::new(bench_animal(), "Leo")
    }])
}

/// A service over `store` with the instant model, and a session in it already holding
/// `history` messages (written straight to the store, not timed).
pub async fn service_with_history(
    store: Arc<dyn ConversationStore>,
    history: usize,
) -> (ConversationService, Principal, SessionId) {
    let principal = Principal::new(
        UserId::new("bench_kid").expect("valid id"),
        UserRole::Student,
    );
    // The running summary is off: the legacy layout has none, and its cost is measured
    // by the `long_conversation` bench.
    let service = ConversationService::with(
        store.clone(),
        Arc::new(bench_personas()),
        Arc::new(InstantModel),
        Arc::new(cmz_core::access::OwnerOrAdminPolicy),
        ConversationConfig {
            summary_every_turns: 0,
            ..ConversationConfig::default()
        },
    );
    let id = SessionId::generate(&bench_animal(), &principal.user_id).expect("valid id");
    let session = Session::new(id.clone(), principal.user_id.clone(), bench_animal(), "Leo");
    store.create_session(&session).await.expect("create");
    // The history goes in as one append, so setting up 10,000 messages is not itself
    // quadratic in the legacy layout.
    let question = "q".repeat(90);
    let answer = "a".repeat(600);
    // Counted once, as the engine counts every message it stores.
    let tokenizer = cmz_core::tokens::Tokenizer::default();
    let counts = [tokenizer.count(&question), tokenizer.count(&answer)];
    let messages: Vec<_> = (0..history)
        .map(|i| {
            let (role, text) = if i % 2 == 0 {
                (Role::User, &question)
            } else {
                (Role::Assistant, &answer)
            };
            let mut message = cmz_core::types::NewMessage::new(role, text.as_str());
            message.metadata.token_count = Some(counts[i % 2]);
            message
        })
        .collect();
    if !messages.is_empty() {
        let append = TurnAppend {
            session_id: id.clone(),
            expected_count: 0,
            messages,
            turn_key: None,
            new_session: None,
            began_at: chrono::Utc::now(),
        };
        store.append_turn(append).await.expect("prefill");
    }
    (service, principal, id)
}

/// One timed turn in `id`: a 90-character question, as in the legacy measurements.
pub async fn one_turn(service: &ConversationService, principal: &Principal, id: &SessionId) {
    let request = TurnRequest::new(bench_animal(), "Why do lions sleep so much? Do you dream when you sleep all day long in the sun, Leo? Tell me")
        .in_session(id.clone());
    service.turn(principal, request).await.expect("turn");
}
