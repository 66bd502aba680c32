//! A long scripted conversation through the turn engine on any store: the context budget,
//! the running summary and a constant cost per turn, checked turn by turn.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::TryStreamExt as _;

use crate::access::{OwnerOrAdminPolicy, Principal, UserRole};
use crate::chat::{ChatCompletion, ChatModel, ChatRequest};
use crate::error::Result;
use crate::ids::{AnimalId, SessionId};
use crate::memory::InMemoryPersonaDirectory;
use crate::service::prompt::{ROLLING_SUMMARY_PREFIX, is_persona_prompt};
use crate::service::{ConversationConfig, ConversationService, TurnRequest};
use crate::store::{
    AppendOutcome, ConversationStore, DeleteReport, DeleteScope, DynConversationStore, Page,
    PageRequest, SessionScope, TurnAppend,
};
use crate::tokens::Tokenizer;
use crate::types::{Message, Persona, Role, RollingSummary, Session, Usage};

use super::random_user;

/// A store that counts the requests made to the store it wraps.
#[derive(Debug)]
pub struct CountingStore {
    inner: DynConversationStore,
    requests: AtomicU64,
}

impl CountingStore {
    /// Counts the requests to `inner`.
    pub fn new(inner: DynConversationStore) -> Self {
        Self {
            inner,
            requests: AtomicU64::new(0),
        }
    }

    /// Requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn count(&self) -> &dyn ConversationStore {
        self.requests.fetch_add(1, Ordering::SeqCst);
        &*self.inner
    }
}

#[async_trait]
impl ConversationStore for CountingStore {
    async fn create_session(&self, session: &Session) -> Result<()> {
        self.count().create_session(session).await
    }
    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        self.count().get_session(id).await
    }
    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome> {
        self.count().append_turn(append).await
    }
    async fn find_turn(&self, id: &SessionId, key: &str) -> Result<Option<Vec<Message>>> {
        self.count().find_turn(id, key).await
    }
    async fn recent_messages(&self, id: &SessionId, limit: usize) -> Result<Vec<Message>> {
        self.count().recent_messages(id, limit).await
    }
    async fn messages_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        self.count().messages_after(id, after, limit).await
    }
    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>> {
        self.count().history(id, page).await
    }
    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>> {
        self.count().list_sessions(scope, page).await
    }
    async fn set_summary(&self, id: &SessionId, summary: &str) -> Result<()> {
        self.count().set_summary(id, summary).await
    }
    async fn set_rolling_summary(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool> {
        self.count().set_rolling_summary(id, summary).await
    }
    async fn set_thread_id(&self, id: &SessionId, thread_id: &str) -> Result<()> {
        self.count().set_thread_id(id, thread_id).await
    }
    async fn delete(&self, scope: DeleteScope) -> Result<DeleteReport> {
        self.count().delete(scope).await
    }
}

/// A scripted model for long conversations: it answers every turn with `reply_chars`
/// characters about lions, and writes running summaries that keep the pets the visitor
/// named (a deterministic summarizer). It records each turn's prompt and reports the
/// usage a provider would (counted with `tokenizer`).
#[derive(Debug)]
pub struct LongConversationModel {
    tokenizer: Tokenizer,
    reply: String,
    turns: Mutex<Vec<ChatRequest>>,
    folds: AtomicU64,
}

impl LongConversationModel {
    /// Replies of about `reply_chars` characters.
    pub fn new(tokenizer: Tokenizer, reply_chars: usize) -> Self {
        let sentence = "Lions rest for up to twenty hours a day and hunt together at dusk. ";
        let reply = sentence.repeat(reply_chars / sentence.len() + 1)[..reply_chars]
            .trim()
            .to_owned();
        Self {
            tokenizer,
            reply,
            turns: Mutex::default(),
            folds: AtomicU64::new(0),
        }
    }

    /// The turn prompts received so far (summary requests are not included).
    pub fn turn_requests(&self) -> Vec<ChatRequest> {
        self.turns.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many summary requests it answered.
    pub fn folds(&self) -> u64 {
        self.folds.load(Ordering::SeqCst)
    }

    /// The pets named in a text ("my dog is called Biscuit" → "dog Biscuit"), kept by the
    /// summarizer.
    fn pets(text: &str) -> BTreeSet<String> {
        let mut pets = BTreeSet::new();
        for line in text.lines().chain(text.split(". ")) {
            let lower = line.to_ascii_lowercase();
            for (i, _) in lower.match_indices(" is called ") {
                let kind = lower[..i].rsplit(' ').next().unwrap_or("pet");
                let name: String = line[i + 11..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric())
                    .collect();
                if !name.is_empty() {
                    pets.insert(format!("The visitor's {kind} is called {name}."));
                }
            }
        }
        pets
    }
}

#[async_trait]
impl ChatModel for LongConversationModel {
    async fn complete(&self, request: ChatRequest) -> Result<ChatCompletion> {
        let prompt_tokens = self.tokenizer.count_request(&request);
        let is_fold = request
            .messages
            .first()
            .is_some_and(|m| m.content.starts_with(ROLLING_SUMMARY_PREFIX));
        let content = if is_fold {
            self.folds.fetch_add(1, Ordering::SeqCst);
            let input = request.messages.last().map_or("", |m| m.content.as_str());
            let mut summary: Vec<String> = Self::pets(input).into_iter().collect();
            summary.push("They talked about how lions live and hunt.".into());
            summary.join(" ")
        } else {
            self.turns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(request);
            self.reply.clone()
        };
        Ok(ChatCompletion {
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens: self.tokenizer.count(&content),
                cached_prompt_tokens: None,
            }),
            content,
            model: Some("long-conversation".into()),
        })
    }

    fn name(&self) -> &str {
        "long-conversation"
    }
}

/// How a long conversation is run.
#[derive(Debug, Clone)]
pub struct LongConversationOptions {
    /// Turns to run.
    pub turns: usize,
    /// The engine's settings (budget, turn cap, summary cadence).
    pub config: ConversationConfig,
    /// Characters in each reply.
    pub reply_chars: usize,
}

impl Default for LongConversationOptions {
    fn default() -> Self {
        Self {
            turns: 500,
            config: ConversationConfig {
                context_budget_tokens: 1_500,
                context_window: 10,
                ..ConversationConfig::default()
            },
            reply_chars: 600,
        }
    }
}

/// What happened in each turn of a long conversation.
#[derive(Debug, Clone)]
pub struct LongConversationReport {
    /// The session.
    pub session_id: SessionId,
    /// Prompt tokens of each turn's model request, counted with the config's tokenizer.
    pub prompt_tokens: Vec<u32>,
    /// Store requests made by each turn, including the running summary it started.
    pub store_requests: Vec<u64>,
    /// Summary requests made to the model.
    pub folds: u64,
    /// The session's running summary at the end.
    pub summary: Option<RollingSummary>,
    /// Each turn's model request.
    pub requests: Vec<ChatRequest>,
    /// What was said, in order: (role, text) of every message.
    pub said: Vec<(Role, String)>,
}

/// The message of turn `n` (from 1): turn 3 tells the animal the name of the visitor's dog.
pub fn long_conversation_message(n: usize) -> String {
    if n == 3 {
        "my dog is called Biscuit, does he look like a lion?".to_owned()
    } else {
        format!("question {n}: how far can a lion's roar be heard, and why do lions roar?")
    }
}

/// Runs a scripted conversation of `options.turns` turns on `store`, waiting after each
/// turn for its running summary (so each turn's store requests include its summary's).
pub async fn run_long_conversation(
    store: DynConversationStore,
    options: &LongConversationOptions,
) -> LongConversationReport {
    let counting = Arc::new(CountingStore::new(store));
    let model = Arc::new(LongConversationModel::new(
        options.config.tokenizer,
        options.reply_chars,
    ));
    let lion = AnimalId::new("lion").expect("valid id");
    let personas = InMemoryPersonaDirectory::with_personas([Persona {
        personality: "proud, sleepy and kind; loves telling children about the savanna".into(),
        facts: vec![
            "Lions sleep up to twenty hours a day.".into(),
            "A lion's roar can be heard eight kilometres away.".into(),
            "Lions live in family groups called prides.".into(),
        ],
        guidelines: vec!["Mention the keeper talk at 2pm when asked about feeding.".into()],
        ..Persona::new(lion.clone(), "Leo")
    }]);
    let service = ConversationService::with(
        counting.clone(),
        Arc::new(personas),
        model.clone(),
        Arc::new(OwnerOrAdminPolicy),
        options.config.clone(),
    );
    let kid = Principal::new(random_user(), UserRole::Student);
    let mut session: Option<SessionId> = None;
    let mut store_requests = Vec::with_capacity(options.turns);
    let mut said = Vec::with_capacity(options.turns * 2);
    for n in 1..=options.turns {
        let before = counting.requests();
        let message = long_conversation_message(n);
        let mut request = TurnRequest::new(lion.clone(), message.clone());
        if let Some(id) = &session {
            request = request.in_session(id.clone());
        }
        let reply = service.turn(&kid, request).await.expect("turn");
        service.summaries_settled().await;
        store_requests.push(counting.requests() - before);
        said.push((Role::User, message));
        said.push((Role::Assistant, reply.reply.clone()));
        session = Some(reply.session_id);
    }
    let session_id = session.expect("at least one turn");
    let stored = counting
        .get_session(&session_id)
        .await
        .expect("session")
        .expect("session exists");
    let requests = model.turn_requests();
    LongConversationReport {
        session_id,
        prompt_tokens: requests
            .iter()
            .map(|r| options.config.tokenizer.count_request(r))
            .collect(),
        store_requests,
        folds: model.folds(),
        summary: stored.rolling_summary,
        requests,
        said,
    }
}

/// The long-conversation contract on `store`: every prompt within the budget with the
/// persona prompt first, a fact from turn 3 still reaching the model at turn 400 through
/// the running summary alone, every message paging back unchanged, and the same store
/// requests per turn early and late.
pub async fn check_long_conversation(store: DynConversationStore) {
    let options = LongConversationOptions::default();
    let budget = options.config.context_budget_tokens;
    let report = run_long_conversation(store.clone(), &options).await;
    assert_eq!(report.requests.len(), options.turns);
    for (i, (request, tokens)) in report
        .requests
        .iter()
        .zip(&report.prompt_tokens)
        .enumerate()
    {
        assert!(
            *tokens <= budget,
            "turn {}: {tokens} prompt tokens over the budget of {budget}",
            i + 1
        );
        let first = &request.messages[0];
        assert!(
            first.role == Role::System && is_persona_prompt(&first.content),
            "turn {}: the persona prompt comes first",
            i + 1
        );
        let history = &request.messages[1..request.messages.len() - 1];
        let turns: Vec<_> = history.iter().filter(|m| m.role != Role::System).collect();
        assert!(
            turns.len() % 2 == 0
                && turns
                    .chunks(2)
                    .all(|pair| pair[0].role == Role::User && pair[1].role == Role::Assistant),
            "turn {}: whole turns only",
            i + 1
        );
    }
    // The budget binds: the window holds fewer turns than the cap.
    let late = &report.requests[399];
    let window_turns = late
        .messages
        .iter()
        .filter(|m| m.role == Role::User)
        .count()
        - 1;
    assert!(
        window_turns < options.config.context_window,
        "the budget, not the cap, chose {window_turns} turns"
    );
    // Turn 3's fact reaches turn 400 only through the summary.
    assert!(
        late.messages
            .iter()
            .any(|m| m.role == Role::System && m.content.contains("Biscuit")),
        "the dog's name reaches the model at turn 400 through the running summary"
    );
    assert!(
        !late
            .messages
            .iter()
            .any(|m| m.role != Role::System && m.content.contains("Biscuit")),
        "turn 3 itself is long out of the window"
    );
    let summary = report.summary.as_ref().expect("a running summary");
    assert!(summary.through > 900 && summary.folds > 100, "{summary:?}");
    assert!(!summary.fallback);
    assert!(summary.tokens_spent > 0);
    // Every message pages back unchanged.
    let id = &report.session_id;
    let stored: Vec<Message> =
        crate::store::paged(|cursor| store.history(id, PageRequest { limit: 137, cursor }))
            .try_collect()
            .await
            .expect("history");
    assert_eq!(stored.len(), options.turns * 2);
    for (i, (message, (role, text))) in stored.iter().zip(&report.said).enumerate() {
        assert_eq!(message.seq, i as u64 + 1);
        assert_eq!(
            (&message.role, &message.content),
            (role, text),
            "message {}",
            i + 1
        );
        assert_eq!(
            message.metadata.token_count,
            Some(options.config.tokenizer.count(text)),
            "message {} keeps its token count",
            i + 1
        );
    }
    // The same store requests around turn 20 and turn 500 (two summary folds in each
    // stretch of eight turns).
    let early: u64 = report.store_requests[16..24].iter().sum();
    let late: u64 = report.store_requests[492..500].iter().sum();
    assert_eq!(
        early,
        late,
        "store requests for turns 17-24 and 493-500: {:?} / {:?}",
        &report.store_requests[16..24],
        &report.store_requests[492..500]
    );
}
