//! The HTTP API over real loopback HTTP: every route, its errors, the access policy, SSE
//! read with a real SSE client, and a client that disconnects mid-stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cmz_core::auth::{AuthService, AuthSettings, AuthStores, DevDirectory, PasswordHasher};
use cmz_core::ids::AnimalId;
use cmz_core::memory::{InMemoryConversationStore, InMemoryPersonaDirectory};
use cmz_core::service::{Budgets, ConversationConfig, ConversationService, TurnRequest};
use cmz_core::testing::ScriptedModel;
use cmz_core::types::{AnimalStatus, Persona};
use cmz_tower::{AppState, HttpSettings};
use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{Value, json};

const SECRET: &[u8] = b"http-test-secret-http-test-secret-0123456789";

struct Server {
    base: String,
    client: reqwest::Client,
    state: AppState,
}

async fn start_with(model: ScriptedModel, settings: HttpSettings) -> Server {
    start_with_personas(model, settings, cmz_tower::sample_personas()).await
}

async fn start_with_personas(
    model: ScriptedModel,
    settings: HttpSettings,
    personas: Vec<Persona>,
) -> Server {
    start_limited(model, settings, personas, 50).await
}

/// A server whose users may make `turn_limit` model calls an hour.
async fn start_limited(
    model: ScriptedModel,
    settings: HttpSettings,
    personas: Vec<Persona>,
    turn_limit: u32,
) -> Server {
    start_budgeted(model, settings, personas, turn_limit, Budgets::default()).await
}

/// A server with a turn limit and daily token budgets.
async fn start_budgeted(
    model: ScriptedModel,
    settings: HttpSettings,
    personas: Vec<Persona>,
    turn_limit: u32,
    budgets: Budgets,
) -> Server {
    start_configured(
        model,
        settings,
        personas,
        turn_limit,
        budgets,
        ConversationConfig::default(),
    )
    .await
}

/// A server with the sample animals and an engine config of its own.
async fn start_with_config(model: ScriptedModel, config: ConversationConfig) -> Server {
    start_configured(
        model,
        HttpSettings::default(),
        cmz_tower::sample_personas(),
        50,
        Budgets::default(),
        config,
    )
    .await
}

async fn start_configured(
    model: ScriptedModel,
    settings: HttpSettings,
    personas: Vec<Persona>,
    turn_limit: u32,
    budgets: Budgets,
    config: ConversationConfig,
) -> Server {
    let stores = AuthStores::in_memory();
    let rate_limits = stores.limits.clone();
    let auth_settings = AuthSettings {
        hasher: PasswordHasher::new(1024, 1, 1).unwrap(),
        dev_users: Some(DevDirectory::embedded()),
        ..AuthSettings::with_secret(SECRET).unwrap()
    };
    let auth = AuthService::new(auth_settings, stores).await.unwrap();
    let personas = Arc::new(InMemoryPersonaDirectory::with_personas(personas));
    let conversations = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        personas.clone(),
        Arc::new(model),
        Arc::new(auth.policy()),
        config,
    )
    .with_turn_limit(rate_limits.clone(), turn_limit, Duration::from_secs(3600))
    .with_budgets(rate_limits.clone(), budgets)
    .with_care(Arc::new(cmz_core::memory::InMemoryCareStore::new()));
    let services = cmz_tower::Services::new(conversations, auth, cmz_tower::offline_health());
    let state = AppState::new(services, settings);
    let app = cmz_tower::router(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server {
        base: format!("http://{address}"),
        client: reqwest::Client::new(),
        state,
    }
}

async fn start() -> Server {
    start_with(ScriptedModel::echo(), HttpSettings::default()).await
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let body = self
            .post_json(
                "/auth",
                None,
                json!({"username": email, "password": password}),
            )
            .await;
        assert_eq!(body.0, 200, "{body:?}");
        body.1["token"].as_str().unwrap().to_owned()
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        (status, body)
    }

    async fn post_json(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(self.url(path));
        if path.starts_with("/convo_turn/stream") {
            // As EventSource does; it is what lets `?token=` count.
            request = request.header("accept", "text/event-stream");
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    async fn turn(
        &self,
        token: &str,
        animal: &str,
        message: &str,
        session: Option<&str>,
    ) -> (u16, Value) {
        let mut body = json!({"animalId": animal, "message": message});
        if let Some(session) = session {
            body["sessionId"] = session.into();
        }
        self.post_json("/convo_turn", Some(token), body).await
    }
}

fn assert_error(response: &(u16, Value), status: u16, code: &str) {
    assert_eq!(response.0, status, "{response:?}");
    assert_eq!(response.1["code"], code, "{response:?}");
    assert!(response.1["message"].is_string(), "{response:?}");
}

#[tokio::test]
async fn the_seed_checklist_auth_family_list_turn_history() {
    let server = start().await;
    let token = server.login("admin@cmz.org", "admin123").await;
    let families = server.get("/family_list", Some(&token)).await;
    assert_eq!(families.0, 200);
    assert_eq!(families.1.as_array().unwrap().len(), 2, "{families:?}");
    let turn = server.turn(&token, "porcupine", "Hello Pokey!", None).await;
    assert_eq!(turn.0, 200, "{turn:?}");
    assert_eq!(turn.1["reply"], "echo: Hello Pokey!");
    assert!(turn.1["turn"]["convoTurnId"].is_string());
    assert_eq!(turn.1["turn"]["tokensPrompt"], 10);
    let session = turn.1["sessionId"].as_str().unwrap().to_owned();
    let history = server
        .get(
            &format!("/convo_history?sessionId={session}&includeMetadata=true"),
            Some(&token),
        )
        .await;
    assert_eq!(history.0, 200);
    let turns = history.1["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["role"], "user");
    assert_eq!(turns[0]["content"], "Hello Pokey!");
    assert_eq!(turns[1]["metadata"]["tokensCompletion"], 5);
    // Without a session id: the user's latest conversation with that animal.
    let latest = server
        .get("/convo_history?animalId=porcupine", Some(&token))
        .await;
    assert_eq!(latest.1["sessionId"], session.as_str());
    let paged = server
        .get(
            &format!("/convo_history?sessionId={session}&limit=1&offset=1"),
            Some(&token),
        )
        .await;
    assert_eq!(paged.1["turns"].as_array().unwrap().len(), 1);
    assert_eq!(paged.1["turns"][0]["role"], "assistant");
}

#[tokio::test]
async fn auth_routes_and_their_errors() {
    let server = start().await;
    assert_error(
        &server
            .post_json(
                "/auth",
                None,
                json!({"username": "admin@cmz.org", "password": "wrong"}),
            )
            .await,
        401,
        "unauthorized",
    );
    assert_error(
        &server
            .post_json("/auth", None, json!({"password": "x"}))
            .await,
        400,
        "validation_error",
    );
    let login = server
        .post_json(
            "/auth",
            None,
            json!({"email": "parent@cmz.org", "password": "parent123"}),
        )
        .await;
    assert_eq!(login.1["user"]["role"], "parent");
    assert!(login.1["expiresIn"].as_u64().unwrap() > 0);
    let token = login.1["token"].as_str().unwrap();
    let me = server.get("/me", Some(token)).await;
    assert_eq!(
        (me.0, me.1["email"].as_str()),
        (200, Some("parent@cmz.org"))
    );
    assert!(me.1.get("passwordHash").is_none());
    assert_error(&server.get("/me", None).await, 401, "unauthorized");
    assert_error(
        &server.get("/me", Some("not.a.token")).await,
        401,
        "unauthorized",
    );
    let by_query = server.get(&format!("/me?token={token}"), None).await;
    assert_error(&by_query, 401, "unauthorized");

    let refreshed = server
        .post_json(
            "/auth/refresh",
            None,
            json!({"refreshToken": login.1["refreshToken"]}),
        )
        .await;
    assert_eq!(refreshed.0, 200);
    assert_error(
        &server
            .post_json(
                "/auth/refresh",
                None,
                json!({"refreshToken": login.1["refreshToken"]}),
            )
            .await,
        401,
        "unauthorized",
    );
    let new_token = refreshed.1["token"].as_str().unwrap();
    assert_error(
        &server.get("/me", Some(new_token)).await,
        401,
        "unauthorized",
    );

    let fresh = server.login("student1@cmz.org", "student123").await;
    let logout = server
        .send(
            server
                .client
                .post(server.url("/auth/logout"))
                .bearer_auth(&fresh),
        )
        .await;
    assert_eq!(logout.0, 204);
    assert_error(&server.get("/me", Some(&fresh)).await, 401, "unauthorized");
}

#[tokio::test]
async fn parents_read_their_students_and_nobody_else_does() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let leo = server.login("student2@cmz.org", "student123").await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let kim = server.login("other@cmz.org", "other123").await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let turn = server.turn(&ana, "cougar", "Hi Cora", None).await;
    let session = turn.1["sessionId"].as_str().unwrap().to_owned();
    let path = format!("/convo_history?sessionId={session}");
    assert_eq!(server.get(&path, Some(&parent)).await.0, 200);
    assert_eq!(server.get(&path, Some(&admin)).await.0, 200);
    // A session the caller may not read answers like an unknown one.
    assert_error(&server.get(&path, Some(&kim)).await, 404, "not_found");
    assert_error(&server.get(&path, Some(&leo)).await, 404, "not_found");
    let listing = "/conversations/sessions?userId=user_student_ana";
    let sessions = server.get(listing, Some(&parent)).await;
    assert_eq!(sessions.1["sessions"].as_array().unwrap().len(), 1);
    assert_error(&server.get(listing, Some(&kim)).await, 403, "forbidden");
    let detail = server
        .get(&format!("/conversations/sessions/{session}"), Some(&parent))
        .await;
    assert_eq!(detail.1["turns"].as_array().unwrap().len(), 2);
    assert_error(
        &server
            .get(&format!("/conversations/sessions/{session}"), Some(&kim))
            .await,
        404,
        "not_found",
    );
    // Nobody speaks for a child, not even the admin or the parent (who may read it): a
    // turn of theirs with its id is a conversation of their own.
    for (token, owner) in [(&admin, "user_admin"), (&parent, "user_parent_rivera")] {
        let turn = server.turn(token, "cougar", "hijack", Some(&session)).await;
        assert_eq!(turn.0, 200, "{turn:?}");
        let theirs = turn.1["sessionId"].as_str().unwrap();
        assert_ne!(theirs, session);
        let detail = server
            .get(&format!("/conversations/sessions/{theirs}"), Some(token))
            .await;
        assert_eq!(detail.1["userId"], owner, "{detail:?}");
    }
    let detail = server
        .get(&format!("/conversations/sessions/{session}"), Some(&parent))
        .await;
    assert_eq!(detail.1["turns"].as_array().unwrap().len(), 2);
    // Families: a parent sees their own, the admin all.
    assert_eq!(
        server
            .get("/family_list", Some(&parent))
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Summaries need read access.
    assert_eq!(
        server
            .post_json(
                "/summarize_convo",
                Some(&parent),
                json!({"sessionId": session})
            )
            .await
            .0,
        200
    );
    assert_error(
        &server
            .post_json(
                "/summarize_convo",
                Some(&kim),
                json!({"sessionId": session}),
            )
            .await,
        404,
        "not_found",
    );
}

async fn sse_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let mut events = response.bytes_stream().eventsource();
    let mut out = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        out.push((event.event, data));
    }
    out
}

#[tokio::test]
async fn streamed_turns_use_the_legacy_events_and_headers() {
    let server = start().await;
    let token = server.login("student1@cmz.org", "student123").await;
    let response = server
        .client
        .get(server.url(&format!(
            "/convo_turn/stream?animalId=cougar&message=Can%20you%20jump%3F&token={token}"
        )))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let events = sse_events(response).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"session"));
    assert_eq!(names[1], "metadata");
    assert_eq!(names.last(), Some(&"complete"));
    assert!(names[2..names.len() - 1].iter().all(|n| *n == "message"));
    assert!(names.len() > 4, "several content events: {names:?}");
    let (_, session) = &events[0];
    assert_eq!(session["type"], "new_session");
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "message")
        .map(|(_, d)| d["content"].as_str().unwrap())
        .collect();
    let (_, complete) = events.last().unwrap();
    assert_eq!(complete["fullResponse"], text.as_str());
    assert_eq!(text, "echo: Can you jump?");
    assert_eq!(
        complete["chunkCount"].as_u64().unwrap() as usize,
        names.len() - 3
    );
    assert_eq!(events[2].1["chunkId"], 1);

    // The POST variant, continuing the session: no `session` event.
    let session_id = session["sessionId"].as_str().unwrap();
    let response = server
        .client
        .post(server.url("/convo_turn/stream"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(
            json!({"animalId": "cougar", "message": "x".repeat(3000), "sessionId": session_id})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let events = sse_events(response).await;
    assert_eq!(events[0].0, "metadata");
    assert_eq!(events.last().unwrap().1["turn"], 2);
    // Request errors come before any event, as JSON.
    let bad = server
        .get(
            &format!("/convo_turn/stream?animalId=dragon&message=hi&token={token}"),
            None,
        )
        .await;
    assert_error(&bad, 404, "not_found");
    let missing = server
        .get(
            &format!("/convo_turn/stream?animalId=cougar&token={token}"),
            None,
        )
        .await;
    assert_error(&missing, 400, "validation_error");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_leaves_an_interrupted_reply() {
    let model = ScriptedModel::always("one two three four five six seven eight nine ten")
        .with_chunk_delay(Duration::from_millis(40));
    // No grace period: a client that goes away cancels the model at once.
    let config = ConversationConfig {
        stream_resume_grace: Duration::ZERO,
        ..ConversationConfig::default()
    };
    let server = start_with_config(model, config).await;
    let token = server.login("student1@cmz.org", "student123").await;
    let response = server
        .client
        .get(server.url(&format!(
            "/convo_turn/stream?animalId=cougar&message=story&token={token}"
        )))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream().eventsource();
    let mut session = String::new();
    let mut contents = 0;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        if event.event == "session" {
            session = data["sessionId"].as_str().unwrap().to_owned();
        }
        if event.event == "message" {
            contents += 1;
            if contents == 2 {
                break;
            }
        }
    }
    drop(events);
    let mut turns = Vec::new();
    for _ in 0..100 {
        let history = server
            .get(
                &format!("/convo_history?sessionId={session}&includeMetadata=true"),
                Some(&token),
            )
            .await;
        if history.0 == 200 {
            turns = history.1["turns"].as_array().unwrap().clone();
            if turns.len() == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(turns.len(), 2, "the turn was stored");
    assert_eq!(turns[1]["metadata"]["interrupted"], true);
    let stored = turns[1]["content"].as_str().unwrap();
    assert!(
        stored.starts_with("one two") && stored.len() < 40,
        "{stored}"
    );
}

#[tokio::test]
async fn bad_requests_are_4xx_json_never_5xx() {
    let server = start().await;
    let token = server.login("student1@cmz.org", "student123").await;
    let raw = |body: &'static str, content_type: &'static str| {
        server
            .client
            .post(server.url("/convo_turn"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
    };
    assert_error(
        &server
            .send(raw("{\"animalId\": ", "application/json"))
            .await,
        400,
        "validation_error",
    );
    assert_error(
        &server
            .send(raw(
                "{\"animalId\": 5, \"message\": []}",
                "application/json",
            ))
            .await,
        400,
        "validation_error",
    );
    assert_error(
        &server
            .send(raw("animalId=x", "application/x-www-form-urlencoded"))
            .await,
        415,
        "unsupported_media_type",
    );
    let huge = json!({"animalId": "cougar", "message": "x".repeat(200_000)}).to_string();
    let oversized = server
        .send(
            server
                .client
                .post(server.url("/convo_turn"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(huge),
        )
        .await;
    assert_error(&oversized, 413, "payload_too_large");
    for (body, field) in [
        (
            json!({"animalId": "cougar", "message": "hi", "contextWindow": 21}),
            "contextWindow",
        ),
        (
            json!({"animalId": "cougar", "message": "hi", "contextWindow": 0}),
            "contextWindow",
        ),
        (
            json!({"animalId": "cougar", "message": "hi", "maxTokens": 5}),
            "maxTokens",
        ),
        (
            json!({"animalId": "cougar", "message": "hi", "temperature": 3.0}),
            "temperature",
        ),
        (
            json!({"animalId": "cougar", "message": "hi", "priority": "urgent"}),
            "priority",
        ),
        (json!({"animalId": "bad id!", "message": "hi"}), "animalId"),
        (json!({"animalId": "cougar", "message": ""}), "message"),
    ] {
        let response = server.post_json("/convo_turn", Some(&token), body).await;
        assert_error(&response, 400, "validation_error");
        assert_eq!(response.1["details"]["field"], field, "{response:?}");
    }
    assert_error(
        &server.get("/convo_history?limit=abc", Some(&token)).await,
        400,
        "validation_error",
    );
    assert_error(
        &server.get("/convo_history?limit=501", Some(&token)).await,
        400,
        "validation_error",
    );
    assert_error(
        &server
            .get("/convo_history?startDate=yesterday", Some(&token))
            .await,
        400,
        "validation_error",
    );
    assert_error(
        &server
            .get("/conversations/sessions?sortBy=name", Some(&token))
            .await,
        400,
        "validation_error",
    );
    assert_error(
        &server.get("/no/such/route", Some(&token)).await,
        404,
        "not_found",
    );
    assert_error(&server.get("/no/such/route", None).await, 404, "not_found");
    assert_error(
        &server
            .send(
                server
                    .client
                    .put(server.url("/convo_turn"))
                    .bearer_auth(&token),
            )
            .await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &server
            .get("/conversations/sessions/conv_x_y_00000000", Some(&token))
            .await,
        404,
        "not_found",
    );
}

#[tokio::test]
async fn deletes_need_gdpr_confirmation_for_bulk_and_are_audited() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let first = server.turn(&ana, "cougar", "one", None).await.1["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    server.turn(&ana, "porcupine", "two", None).await;
    let delete = |token: &str, query: &str| {
        server
            .client
            .delete(server.url(&format!("/convo_history?{query}")))
            .bearer_auth(token.to_owned())
    };
    let response = server
        .send(delete(&ana, &format!("sessionId={first}")))
        .await;
    assert_eq!(response.0, 204);
    assert_error(
        &server
            .get(&format!("/convo_history?sessionId={first}"), Some(&ana))
            .await,
        404,
        "not_found",
    );
    let bulk = server.send(delete(&admin, "userId=user_student_ana")).await;
    assert_error(&bulk, 400, "gdpr_confirmation_required");
    assert_eq!(bulk.1["details"]["required_parameter"], "confirmGDPR");
    assert_error(
        &server
            .send(delete(&ana, "animalId=cougar&confirmGDPR=true"))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &server.send(delete(&ana, "")).await,
        400,
        "validation_error",
    );
    let done = server
        .send(delete(
            &admin,
            "userId=user_student_ana&confirmGDPR=true&auditReason=parent%20request",
        ))
        .await;
    assert_eq!(done.0, 204);
    let sessions = server.get("/conversations/sessions", Some(&ana)).await;
    assert!(sessions.1["sessions"].as_array().unwrap().is_empty());
    let _ = server.state.auth();
}

#[tokio::test]
async fn turns_are_rate_limited_per_user_with_the_legacy_details() {
    let server = start_limited(
        ScriptedModel::echo(),
        HttpSettings::default(),
        cmz_tower::sample_personas(),
        2,
    )
    .await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let leo = server.login("student2@cmz.org", "student123").await;
    for _ in 0..2 {
        assert_eq!(server.turn(&ana, "cougar", "hi", None).await.0, 200);
    }
    let response = server
        .client
        .post(server.url("/convo_turn"))
        .bearer_auth(&ana)
        .header("content-type", "application/json")
        .body(json!({"animalId": "cougar", "message": "hi"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 3500 && retry <= 3600, "{retry}");
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "rate_limit_exceeded");
    assert_eq!(body["details"]["limit"], 2);
    assert_eq!(body["details"]["window"], 3600);
    assert!(
        body["details"]["resetTime"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(
        server.turn(&leo, "cougar", "hi", None).await.0,
        200,
        "limits are per user"
    );
    let stream = server
        .get(
            &format!("/convo_turn/stream?animalId=cougar&message=hi&token={ana}"),
            None,
        )
        .await;
    assert_error(&stream, 429, "rate_limit_exceeded");
}

#[tokio::test]
async fn health_animals_and_request_ids() {
    let server = start().await;
    let health = server.get("/chatgpt/health", None).await;
    assert_eq!(
        (
            health.0,
            health.1["status"].as_str(),
            health.1["offline"].as_bool()
        ),
        (200, Some("healthy"), Some(true))
    );
    let system = server.get("/system_health", None).await;
    assert_eq!(system.1["status"], "ok");
    assert_eq!(system.1["checks"].as_array().unwrap().len(), 2);
    let token = server.login("student1@cmz.org", "student123").await;
    let animals = server.get("/animals", Some(&token)).await;
    assert_eq!(animals.1["animals"].as_array().unwrap().len(), 3);
    let response = server
        .client
        .get(server.url("/system_health"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("x-request-id").is_some());
}

#[tokio::test]
async fn metrics_count_turns_tokens_and_errors() {
    let model = ScriptedModel::echo();
    let server = start_with(model, HttpSettings::default()).await;
    // A second listener serving /metrics from the same process-wide recorder.
    let metrics = cmz_tower::prometheus_router().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, metrics).await.unwrap() });
    let token = server.login("student1@cmz.org", "student123").await;
    server.turn(&token, "cougar", "hi", None).await;
    server.turn(&token, "cougar", "", None).await;
    let text = server
        .client
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The recorder is process-wide: other tests of this binary running at the same time
    // add to it, so this test's own calls are a lower bound.
    let value = |series: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(value("cmz_turns_total{outcome=\"ok\"}") >= 1, "{text}");
    assert!(value("cmz_tokens_total{kind=\"prompt\"}") >= 10, "{text}");
    assert!(
        value("cmz_http_errors_total{code=\"validation_error\"}") >= 1,
        "{text}"
    );
    assert!(text.contains("cmz_turn_duration_seconds"), "{text}");
}

#[tokio::test]
async fn a_panicking_handler_is_a_json_500_and_the_server_lives_on() {
    use axum::routing::get;
    let app = cmz_tower::with_layers(
        axum::Router::new()
            .route(
                "/boom",
                get(|| async {
                    let fail = std::hint::black_box(true);
                    assert!(!fail, "boom");
                    "unreachable"
                }),
            )
            .route("/ok", get(|| async { "ok" })),
        &HttpSettings::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let response = client.get(format!("{base}/boom")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "internal_error");
    assert_eq!(
        client
            .get(format!("{base}/ok"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
}

#[tokio::test]
async fn a_slow_handler_is_a_json_504_with_its_request_id() {
    use axum::routing::get;
    let settings = HttpSettings {
        request_timeout: Duration::from_millis(200),
        ..HttpSettings::default()
    };
    let app = cmz_tower::with_layers(
        axum::Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route("/fast", get(|| async { "fast" })),
        &settings,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let response = client
        .get(format!("{base}/slow"))
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-request-id"], "trace-me-1");
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "timeout", "{body}");
    let fast = client.get(format!("{base}/fast")).send().await.unwrap();
    assert_eq!(fast.status(), 200);
    let generated = fast.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(&generated[14..15], "4", "version 4: {generated}");
}

#[tokio::test]
async fn a_port_in_use_is_a_one_line_error_naming_the_setting() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = taken.local_addr().unwrap();
    let err = cmz_tower::serve(axum::Router::new(), address)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("CMZ_BIND") && !text.contains('\n'), "{text}");
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let settings = HttpSettings {
        cors_origins: vec!["https://zoo.example".parse().unwrap()],
        ..HttpSettings::default()
    };
    let server = start_with(ScriptedModel::echo(), settings).await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/convo_turn"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight("https://zoo.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://zoo.example"
    );
    assert!(
        allowed.headers().get("x-request-id").is_some(),
        "preflights pass the request-id layer"
    );
    let denied = preflight("https://evil.example").await.unwrap();
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    // Without configured origins there is no CORS at all (same origin only).
    let plain = start().await;
    let response = plain
        .client
        .get(plain.url("/system_health"))
        .header("origin", "https://zoo.example")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test]
async fn a_client_chosen_session_id_starts_a_session_that_continues() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let kim = server.login("other@cmz.org", "other123").await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let first = server
        .turn(&ana, "cougar", "Hi Cora", Some("session_1730000000000"))
        .await;
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(first.1["sessionId"], "session_1730000000000");
    assert_eq!(first.1["turnNumber"], 1);
    assert_eq!(first.1["animalId"], "cougar");
    assert_eq!(first.1["turnId"], first.1["turn"]["convoTurnId"]);
    assert_eq!(first.1["timestamp"], first.1["turn"]["timestamp"]);
    let again = server
        .turn(
            &ana,
            "cougar",
            "Can you jump?",
            Some("session_1730000000000"),
        )
        .await;
    assert_eq!((again.0, again.1["turnNumber"].as_u64()), (200, Some(2)));
    let detail = server
        .get("/conversations/sessions/session_1730000000000", Some(&ana))
        .await;
    assert_eq!(detail.1["userId"], "user_student_ana");
    assert_eq!(detail.1["messages"].as_array().unwrap().len(), 4);

    // A taken id is never a way into someone else's conversation, not even the admin's
    // (who may read it): the turn is the caller's own, under a new id the page adopts.
    for token in [&kim, &admin] {
        let turn = server
            .turn(token, "cougar", "let me in", Some("session_1730000000000"))
            .await;
        assert_eq!(turn.0, 200, "{turn:?}");
        assert_ne!(turn.1["sessionId"], "session_1730000000000");
        assert_eq!(turn.1["turnNumber"], 1);
    }
    let detail = server
        .get("/conversations/sessions/session_1730000000000", Some(&ana))
        .await;
    assert_eq!(detail.1["messages"].as_array().unwrap().len(), 4);
    // A body userId naming someone else is ignored: the turn is the caller's own.
    let spoofed = server
        .post_json(
            "/convo_turn",
            Some(&kim),
            json!({"message": "hi", "animalId": "porcupine", "sessionId": "session_42", "userId": "user_student_ana"}),
        )
        .await;
    assert_eq!(spoofed.0, 200, "{spoofed:?}");
    let owner = server
        .get("/conversations/sessions/session_42", Some(&kim))
        .await;
    assert_eq!(owner.1["userId"], "user_student_kim");
    assert_error(
        &server
            .get("/conversations/sessions/session_42", Some(&ana))
            .await,
        404,
        "not_found",
    );
    // Ids are still checked.
    assert_error(
        &server.turn(&ana, "cougar", "hi", Some("a b")).await,
        400,
        "validation_error",
    );
    assert_error(
        &server.turn(&ana, "cougar", "hi", Some("x/../y")).await,
        400,
        "validation_error",
    );

    // The stream does the same: a `session` event names the client's id. Opened by an
    // EventSource (`GET`, the token in the query) and with its request in a JSON body.
    let by_query = |token: &str, message: &str, session: &str| {
        server
            .client
            .get(server.url(&format!(
                "/convo_turn/stream?animalId=cougar&message={message}&sessionId={session}&token={token}"
            )))
            .header("accept", "text/event-stream")
    };
    let by_body = |token: &str, message: &str, session: &str| {
        server
            .client
            .post(server.url("/convo_turn/stream"))
            .bearer_auth(token)
            .header("accept", "text/event-stream")
            .header("content-type", "application/json")
            .body(
                json!({"animalId": "cougar", "message": message, "sessionId": session}).to_string(),
            )
    };
    // The session the `session` event names, checking the stream ends with `complete`.
    let streamed = |request: reqwest::RequestBuilder| async move {
        let events = sse_events(request.send().await.unwrap()).await;
        assert_eq!(events[0].0, "session");
        assert_eq!(events.last().unwrap().0, "complete");
        events[0].1["sessionId"].as_str().unwrap().to_owned()
    };
    for (id, open) in [
        (
            "session_1730000000001",
            &by_query as &dyn Fn(&str, &str, &str) -> reqwest::RequestBuilder,
        ),
        ("session_1730000000002", &by_body),
    ] {
        assert_eq!(streamed(open(&ana, "hello", id)).await, id);
        // Another child's stream with that id is a new conversation of her own.
        let kims = streamed(open(&kim, "hi", id)).await;
        assert_ne!(kims, id);
        let owner = server
            .get(&format!("/conversations/sessions/{kims}"), Some(&kim))
            .await;
        assert_eq!(owner.1["userId"], "user_student_kim", "{owner:?}");
    }
    for (id, turns) in [("session_1730000000001", 2), ("session_1730000000002", 2)] {
        let detail = server
            .get(&format!("/conversations/sessions/{id}"), Some(&ana))
            .await;
        assert_eq!(
            detail.1["messages"].as_array().unwrap().len(),
            turns,
            "{id} is ana's alone: {detail:?}"
        );
    }
}

#[tokio::test]
async fn the_default_animal_is_configurable() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    // Unset: the offered animal with the smallest id.
    let turn = server.turn(&ana, "default", "hi", None).await;
    assert_eq!((turn.0, turn.1["animalId"].as_str()), (200, Some("cougar")));
    let session = turn.1["sessionId"].as_str().unwrap().to_owned();
    let again = server.turn(&ana, "default", "more", Some(&session)).await;
    assert_eq!(again.0, 200, "{again:?}");

    let settings = HttpSettings {
        default_animal: Some(cmz_core::ids::AnimalId::new("porcupine").unwrap()),
        ..HttpSettings::default()
    };
    let server = start_with(ScriptedModel::echo(), settings).await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let turn = server.turn(&ana, "default", "hi", None).await;
    assert_eq!(turn.1["animalId"], "porcupine");
    let detail = server
        .get(
            &format!(
                "/conversations/sessions/{}",
                turn.1["sessionId"].as_str().unwrap()
            ),
            Some(&ana),
        )
        .await;
    assert_eq!(detail.1["sessionInfo"]["animalId"], "porcupine");
    let response = server
        .client
        .get(server.url(&format!(
            "/convo_turn/stream?animalId=default&message=hello&token={ana}"
        )))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let events = sse_events(response).await;
    assert_eq!(events[1].1["animalId"], "porcupine");
}

fn persona(id: &str, status: AnimalStatus) -> Persona {
    let mut persona = Persona::new(cmz_core::ids::AnimalId::new(id).unwrap(), id.to_uppercase());
    persona.species = Some(format!("{id} species"));
    persona.personality = "kind".into();
    persona.system_prompt = Some("a prompt the zoo configured".into());
    persona.status = status;
    persona
}

#[tokio::test]
async fn the_animal_list_is_public_and_offers_only_active_animals() {
    let personas = vec![
        persona("aardvark", AnimalStatus::Hidden),
        persona("bear", AnimalStatus::Active),
        persona("camel", AnimalStatus::Deleted),
        persona("default", AnimalStatus::Active),
    ];
    let server =
        start_with_personas(ScriptedModel::echo(), HttpSettings::default(), personas).await;
    let list = server.get("/animal_list", None).await;
    assert_eq!(list.0, 200);
    let ids: Vec<&str> = list
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["animalId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["bear", "default"]);
    let bear = &list.1[0];
    assert_eq!(bear["name"], "BEAR");
    assert_eq!(bear["species"], "bear species");
    assert_eq!(bear["status"], "active");
    assert_eq!(bear["personality"], "kind");
    assert!(
        bear.get("systemPrompt").is_none(),
        "no configuration in public: {bear}"
    );
    // A token is not needed, and an expired or bad one is not looked at.
    assert_eq!(server.get("/animal_list", Some("not.a.token")).await.0, 200);
    assert_eq!(server.get("/animal/bear", None).await.1, *bear);
    assert_error(
        &server.get("/animal/aardvark", None).await,
        404,
        "not_found",
    );
    assert_error(&server.get("/animal/camel", None).await, 404, "not_found");
    assert_error(&server.get("/animal/nobody", None).await, 404, "not_found");
    assert_error(
        &server.get("/animal/a%20b", None).await,
        400,
        "validation_error",
    );
    assert_eq!(
        server.get("/animal_list?status=hidden", None).await.1,
        json!([])
    );
    assert_eq!(
        server.get("/animal_list?status=active", None).await.1,
        list.1
    );
    assert_error(
        &server.get("/animal_list?status=asleep", None).await,
        400,
        "validation_error",
    );
    // Hidden animals take no turns; an animal named `default` is the default.
    let ana = server.login("student1@cmz.org", "student123").await;
    assert_error(
        &server.turn(&ana, "aardvark", "hi", None).await,
        404,
        "not_found",
    );
    assert_eq!(
        server.turn(&ana, "default", "hi", None).await.1["animalId"],
        "default"
    );
    let animals = server.get("/animals", Some(&ana)).await;
    assert_eq!(animals.1["animals"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_history_pages_get_the_legacy_fields_beside_cmz_s_own() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let leo = server.login("student2@cmz.org", "student123").await;
    let kim = server.login("other@cmz.org", "other123").await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let first = server.turn(&ana, "cougar", "Hi Cora", None).await.1;
    server.turn(&leo, "porcupine", "Hi Pokey", None).await;
    server.turn(&kim, "porcupine", "Hello", None).await;

    let listing = server.get("/conversations/sessions", Some(&ana)).await;
    let entry = &listing.1["sessions"][0];
    assert_eq!(entry["sessionId"], first["sessionId"]);
    assert_eq!(entry["userName"], "Ana Rivera");
    assert_eq!(entry["status"], "active");
    assert_eq!(entry["lastMessage"], "echo: Hi Cora");
    assert_eq!(entry["timestamp"], entry["lastMessageTime"]);
    assert_eq!(entry["createdAt"], entry["startTime"]);
    assert_eq!(entry["messageCount"], 2);

    let detail = server
        .get(
            &format!(
                "/conversations/sessions/{}",
                first["sessionId"].as_str().unwrap()
            ),
            Some(&parent),
        )
        .await
        .1;
    assert_eq!(
        detail["turns"].as_array().unwrap().len(),
        2,
        "cmz's own field stays"
    );
    let messages = detail["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "Hi Cora");
    assert!(messages[0]["tokensUsed"].is_null());
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["tokensUsed"], 15);
    assert_eq!(messages[1]["timestamp"], first["timestamp"]);
    let info = &detail["sessionInfo"];
    assert_eq!(info["animalName"], "Cora the Cougar");
    assert_eq!(info["animalId"], "cougar");
    assert!(info["createdAt"].is_string() && info["updatedAt"].is_string());

    // The family view: a parent reads their own family, nobody reads someone else's.
    let family = server
        .get(
            "/convo_history?parentUserId=user_parent_rivera",
            Some(&parent),
        )
        .await;
    assert_eq!(family.0, 200, "{family:?}");
    let names: Vec<&str> = family.1["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["userName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Leo Rivera", "Ana Rivera"], "newest first");
    let one = server
        .get(
            "/convo_history?parentUserId=user_parent_rivera&animalId=cougar",
            Some(&parent),
        )
        .await;
    assert_eq!(one.1["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(
        server
            .get(
                "/convo_history?parentUserId=user_parent_rivera",
                Some(&admin)
            )
            .await
            .1["sessions"],
        family.1["sessions"]
    );
    for token in [&ana, &kim] {
        assert_error(
            &server
                .get(
                    "/convo_history?parentUserId=user_parent_rivera",
                    Some(token),
                )
                .await,
            403,
            "forbidden",
        );
    }
    let none = server
        .get("/convo_history?parentUserId=user_student_kim", Some(&kim))
        .await;
    assert_eq!(
        none.1["sessions"],
        json!([]),
        "not a parent: no family sessions"
    );

    // Login and /me carry `name`; the summary types of the legacy pages are accepted.
    let login = server
        .post_json(
            "/auth",
            None,
            json!({"username": "parent@cmz.org", "password": "parent123"}),
        )
        .await;
    assert_eq!(login.1["user"]["name"], "Pat Rivera");
    assert_eq!(
        server.get("/me", Some(&parent)).await.1["name"],
        "Pat Rivera"
    );
    for summary_type in ["behavioral", "personalization"] {
        let summary = server
            .post_json(
                "/summarize_convo",
                Some(&parent),
                json!({"sessionId": first["sessionId"], "summaryType": summary_type}),
            )
            .await;
        assert_eq!(summary.1["summaryType"], summary_type, "{summary:?}");
    }
}

#[tokio::test]
async fn the_same_turn_from_http_and_from_python_reaches_the_model_identically() {
    let model = ScriptedModel::echo();
    let server = start_with(model.clone(), HttpSettings::default()).await;
    let token = server.login("student1@cmz.org", "student123").await;
    let (status, body) = server
        .post_json(
            "/convo_turn",
            Some(&token),
            json!({"animalId": "cougar", "message": "Can you roar?"}),
        )
        .await;
    assert_eq!(status, 200, "{body:?}");
    let over_http = model.last_request().unwrap();
    // What cmz-py's `Conversations.turn(principal, "cougar", "Can you roar?")` builds.
    let principal = server.state.auth().authenticate(&token).await.unwrap();
    server
        .state
        .conversations()
        .turn(
            &principal,
            TurnRequest::new(AnimalId::new("cougar").unwrap(), "Can you roar?"),
        )
        .await
        .unwrap();
    let from_python = model.last_request().unwrap();
    assert_eq!(over_http, from_python);
    // The engine's defaults, which are the legacy API's.
    assert_eq!(over_http.temperature, Some(0.7));
    assert_eq!(over_http.max_tokens, Some(300));
    // And the legacy bounds hold over HTTP, with the field named.
    for (body, field) in [
        (
            json!({"animalId": "cougar", "message": "x", "contextWindow": 21}),
            "contextWindow",
        ),
        (
            json!({"animalId": "cougar", "message": "x", "contextWindow": -1}),
            "contextWindow",
        ),
        (
            json!({"animalId": "cougar", "message": "x", "maxTokens": 5}),
            "maxTokens",
        ),
        (
            json!({"animalId": "cougar", "message": "x", "temperature": 3.5}),
            "temperature",
        ),
    ] {
        let (status, error) = server.post_json("/convo_turn", Some(&token), body).await;
        assert_eq!(status, 400, "{error:?}");
        assert_eq!(error["code"], "validation_error");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{error:?}"
        );
    }
}

/// Logs in as `email` through a proxy that says the client is `forwarded_for`.
async fn login_via(server: &Server, email: &str, password: &str, forwarded_for: &str) -> u16 {
    let request = server
        .client
        .post(server.url("/auth"))
        .header("content-type", "application/json")
        .header("x-forwarded-for", forwarded_for)
        .body(json!({"username": email, "password": password}).to_string());
    server.send(request).await.0
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_have_their_own_login_buckets_and_spoofing_is_ignored() {
    // Behind the zoo's load balancer (here: loopback, trusted).
    let behind = start_with(
        ScriptedModel::echo(),
        HttpSettings {
            trusted_proxies: cmz_tower::TrustedProxies::parse("127.0.0.1/32").unwrap(),
            ..HttpSettings::default()
        },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            login_via(&behind, "parent@cmz.org", "wrong", "203.0.113.1").await,
            401
        );
    }
    assert_eq!(
        login_via(&behind, "parent@cmz.org", "parent123", "203.0.113.1").await,
        429,
        "the mistyping client is throttled"
    );
    assert_eq!(
        login_via(&behind, "parent@cmz.org", "parent123", "203.0.113.2").await,
        200,
        "another visitor behind the same balancer is not"
    );

    // Without trusted proxies the header is the client's own claim: ignored.
    let direct = start().await;
    for _ in 0..5 {
        assert_eq!(
            login_via(&direct, "parent@cmz.org", "wrong", "203.0.113.1").await,
            401
        );
    }
    assert_eq!(
        login_via(&direct, "parent@cmz.org", "parent123", "203.0.113.2").await,
        429,
        "a spoofed X-Forwarded-For does not buy a fresh bucket"
    );
}

#[test]
fn trusted_proxies_come_from_cmz_trusted_proxies() {
    let settings = HttpSettings::from_lookup(&|name| {
        (name == "CMZ_TRUSTED_PROXIES").then(|| "10.0.0.0/8, 192.0.2.7".to_owned())
    })
    .unwrap();
    assert!(!settings.trusted_proxies.is_empty());
    let err = HttpSettings::from_lookup(&|name| {
        (name == "CMZ_TRUSTED_PROXIES").then(|| "balancer.internal".to_owned())
    })
    .unwrap_err();
    assert!(err.to_string().contains("CMZ_TRUSTED_PROXIES"), "{err}");
}

/// A long conversation gets a running summary, shown in the session detail; the messages it
/// covers stay as they were, with their token counts.
#[tokio::test]
async fn session_detail_shows_the_running_summary() {
    let server = start().await;
    let token = server.login("student1@cmz.org", "student123").await;
    let mut session: Option<String> = None;
    for n in 1..=10 {
        let reply = server
            .turn(
                &token,
                "cougar",
                &format!("question {n}"),
                session.as_deref(),
            )
            .await;
        assert_eq!(reply.0, 200, "{reply:?}");
        session = reply.1["sessionId"].as_str().map(str::to_owned);
    }
    let path = format!("/conversations/sessions/{}", session.unwrap());
    // Written after the reply, in the background: poll for it.
    let mut detail = Value::Null;
    for _ in 0..100 {
        detail = server.get(&path, Some(&token)).await.1;
        if !detail["rollingSummary"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let summary = &detail["rollingSummary"];
    // The default window is 5 turns and a fold is due once 4 turns are outside it.
    assert_eq!(summary["coversThrough"], 8, "{detail}");
    assert_eq!(summary["folds"], 1);
    assert_eq!(summary["fallback"], false);
    assert!(summary["tokensSpent"].as_u64().unwrap() > 0);
    assert!(summary["text"].as_str().unwrap().contains("question 1"));
    let turns = detail["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 20, "the messages stay");
    assert_eq!(turns[0]["content"], "question 1");
    assert_eq!(turns[0]["metadata"]["tokenCount"], 3);
}

/// A child's personal details are taken out before the turn is stored or sent; the reply
/// and the stored messages show placeholders and the kinds, never the details.
#[tokio::test]
async fn personal_details_are_taken_out_over_http() {
    let server = start().await;
    let token = server.login("student1@cmz.org", "student123").await;
    let reply = server
        .turn(
            &token,
            "cougar",
            "hi, my name is Ana Rivera and my email is ana@example.com",
            None,
        )
        .await;
    assert_eq!(reply.0, 200, "{reply:?}");
    // The echo model repeats what it was sent: the placeholders.
    let text = reply.1["reply"].as_str().unwrap();
    assert!(
        text.contains("my name is [name] and my email is [email]"),
        "{text}"
    );
    assert!(!text.contains("Rivera") && !text.contains("ana@"), "{text}");
    let path = format!(
        "/conversations/sessions/{}",
        reply.1["sessionId"].as_str().unwrap()
    );
    let detail = server.get(&path, Some(&token)).await.1;
    let first = &detail["turns"][0];
    assert_eq!(
        first["content"],
        "hi, my name is [name] and my email is [email]"
    );
    assert_eq!(first["metadata"]["redacted"], json!(["email", "name"]));
}

/// A parent exports their family's conversations as JSON or a printable page; another
/// family's are refused; every export is audited.
#[tokio::test]
async fn a_parent_exports_their_familys_conversations() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let leo = server.login("student2@cmz.org", "student123").await;
    let kim = server.login("other@cmz.org", "other123").await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let first = server
        .turn(&ana, "cougar", "Do you like <b>bold</b> & big cats?", None)
        .await;
    server
        .turn(
            &ana,
            "cougar",
            "second question",
            first.1["sessionId"].as_str(),
        )
        .await;
    server.turn(&leo, "porcupine", "Quills?", None).await;
    server.turn(&kim, "cougar", "Kim's question", None).await;

    let export = |query: &'static str, token: String, accept: &'static str| {
        let request = server
            .client
            .get(server.url(&format!("/conversations/export{query}")))
            .bearer_auth(token)
            .header("accept", accept);
        async move { request.send().await.unwrap() }
    };
    let response = export("", parent.clone(), "application/json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let sessions = body["sessions"].as_array().unwrap();
    assert_eq!(
        sessions.len(),
        2,
        "Ana's and Leo's conversations, not Kim's"
    );
    let mut counts: Vec<(String, usize)> = sessions
        .iter()
        .map(|s| {
            (
                s["session"]["userId"].as_str().unwrap().to_owned(),
                s["messages"].as_array().unwrap().len(),
            )
        })
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("user_student_ana".into(), 4),
            ("user_student_leo".into(), 2)
        ]
    );
    assert!(!body.to_string().contains("Kim's question"));

    // A browser gets the printable page, with the children's text escaped.
    let page = export("", parent.clone(), "text/html,application/xhtml+xml").await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("style-src 'unsafe-inline'")
    );
    let html = page.text().await.unwrap();
    assert!(
        html.contains("Do you like &lt;b&gt;bold&lt;/b&gt; &amp; big cats?"),
        "{html}"
    );
    assert!(html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<section>").count(), 2);

    // A date range that holds nothing.
    let empty = export(
        "?endDate=2001-01-01T00:00:00Z",
        parent.clone(),
        "application/json",
    )
    .await;
    let empty: Value = serde_json::from_str(&empty.text().await.unwrap()).unwrap();
    assert_eq!(empty["sessions"], json!([]));

    // Another family's, and another child's, are refused.
    for (query, token) in [
        ("?parentUserId=user_parent_chen", parent.clone()),
        ("?userId=user_student_kim", parent.clone()),
        ("?userId=user_student_leo", ana.clone()),
    ] {
        let refused = export(query, token, "application/json").await;
        assert_eq!(refused.status(), 403, "{query}");
    }
    // A child exports their own.
    let own = export("", kim.clone(), "application/json").await;
    let own: Value = serde_json::from_str(&own.text().await.unwrap()).unwrap();
    assert_eq!(own["sessions"].as_array().unwrap().len(), 1);
    let bad = export("?format=pdf", parent, "application/json").await;
    assert_eq!(bad.status(), 400);
}

/// A parent erases a child's data: conversations, tokens, family place and account go in
/// one call; nobody else's; repeating it is harmless.
#[tokio::test]
async fn a_parent_erases_a_childs_data() {
    let server = start().await;
    let leo = server.login("student2@cmz.org", "student123").await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let refresh = server
        .post_json(
            "/auth",
            None,
            json!({"username": "student2@cmz.org", "password": "student123"}),
        )
        .await
        .1["refreshToken"]
        .as_str()
        .map(str::to_owned);
    let first = server
        .turn(&leo, "cougar", "my dog Biscuit says hi", None)
        .await;
    server.turn(&ana, "cougar", "Ana's question", None).await;
    let server = &server;
    let delete = |path: String, token: String| {
        let request = server.client.delete(server.url(&path)).bearer_auth(token);
        async move { server.send(request).await }
    };
    // Not someone else's child, not another child.
    assert_eq!(
        delete("/users/user_student_kim/data".into(), parent.clone())
            .await
            .0,
        403
    );
    assert_eq!(
        delete("/users/user_student_leo/data".into(), ana.clone())
            .await
            .0,
        403
    );
    let erased = delete(
        "/users/user_student_leo/data?reason=GDPR-17".into(),
        parent.clone(),
    )
    .await;
    assert_eq!(erased.0, 200, "{erased:?}");
    assert_eq!(erased.1["sessions"], 1);
    assert_eq!(erased.1["messages"], 2);
    assert_eq!(erased.1["account"], true);
    assert_eq!(erased.1["families"], 1);
    let detail = server
        .get(
            &format!(
                "/conversations/sessions/{}",
                first.1["sessionId"].as_str().unwrap()
            ),
            Some(&parent),
        )
        .await;
    assert_eq!(detail.0, 404);
    let family = server
        .get(
            "/convo_history?parentUserId=user_parent_rivera",
            Some(&parent),
        )
        .await;
    let names: Vec<&str> = family.1["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["userName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Ana Rivera"], "Ana's conversation stays");
    // The account is gone: no login, no refresh.
    let login = server
        .post_json(
            "/auth",
            None,
            json!({"username": "student2@cmz.org", "password": "student123"}),
        )
        .await;
    assert_eq!(login.0, 401);
    if let Some(refresh) = refresh {
        let renewed = server
            .post_json("/auth/refresh", None, json!({"refreshToken": refresh}))
            .await;
        assert_eq!(renewed.0, 401, "{renewed:?}");
    }
    // Leo is no longer in the parent's family.
    assert_eq!(
        delete("/users/user_student_leo/data".into(), parent)
            .await
            .0,
        403
    );
    // For an administrator nothing is left: an erasure that finished, or a user cmz
    // never knew, is a 404.
    let admin = server.login("admin@cmz.org", "admin123").await;
    let again = delete("/users/user_student_leo/data".into(), admin.clone()).await;
    assert_error(&again, 404, "not_found");
    let nobody = delete("/users/nobody_at_all/data".into(), admin).await;
    assert_error(&nobody, 404, "not_found");
}

/// Only a family's parents (or an administrator) choose its retention, within bounds.
#[tokio::test]
async fn a_family_chooses_its_retention() {
    let server = start().await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let put = |family: &'static str, token: String, body: Value| {
        let request = server
            .client
            .put(server.url(&format!("/families/{family}/retention")))
            .header("content-type", "application/json")
            .bearer_auth(token)
            .body(body.to_string());
        async { server.send(request).await }
    };
    let set = put("family_rivera", parent.clone(), json!({"days": 30})).await;
    assert_eq!(set.0, 200, "{set:?}");
    assert_eq!(set.1["retentionDays"], 30);
    let listed = server.get("/family_list", Some(&parent)).await;
    assert_eq!(listed.1[0]["retentionDays"], 30);
    assert_error(
        &put("family_chen", parent.clone(), json!({"days": 1})).await,
        403,
        "forbidden",
    );
    assert_error(
        &put("family_rivera", ana, json!({"days": 1})).await,
        403,
        "forbidden",
    );
    assert_error(
        &put("family_none", parent.clone(), json!({"days": 1})).await,
        404,
        "not_found",
    );
    for bad in [
        json!({"days": -1}),
        json!({"days": 3651}),
        json!({"weeks": 2}),
        json!({}),
        json!({"days": "7"}),
    ] {
        assert_error(
            &put("family_rivera", parent.clone(), bad).await,
            400,
            "validation_error",
        );
    }
    let back = put("family_rivera", parent, json!({"days": null})).await;
    assert_eq!(back.0, 200);
    assert!(back.1.get("retentionDays").is_none(), "{back:?}");
}

/// A reply's legacy `rateLimit` block is filled; a thumbs down goes to the staff queue,
/// which staff open and mark reviewed; admins read usage as JSON and CSV; children reach
/// none of the staff routes.
#[tokio::test]
async fn feedback_the_review_queue_and_the_usage_report_over_http() {
    let server = start().await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let leo = server.login("student2@cmz.org", "student123").await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let turn = server.turn(&ana, "cougar", "do you purr?", None).await;
    assert_eq!(turn.0, 200, "{turn:?}");
    let limit = &turn.1["rateLimit"];
    assert_eq!(limit["remaining"], 49, "{limit}");
    assert_eq!(limit["dailyUsage"], 1);
    assert!(limit["resetTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(limit["tokenBudgets"], json!([]));
    let session = turn.1["sessionId"].as_str().unwrap().to_owned();
    let message = turn.1["turnId"].as_str().unwrap().to_owned();
    let path = format!("/conversations/sessions/{session}/messages/{message}/feedback");

    let voted = server
        .post_json(
            &path,
            Some(&ana),
            json!({"vote": "down", "note": "cougars don't purr?"}),
        )
        .await;
    assert_eq!(voted.0, 200, "{voted:?}");
    assert_eq!(voted.1["vote"], "down");
    assert_eq!(voted.1["persona"], "Cora the Cougar");
    assert_eq!(voted.1["model"], "scripted");
    assert_eq!(server.get(&path, Some(&ana)).await.1["vote"], "down");
    assert_error(&server.get(&path, Some(&admin)).await, 404, "not_found");
    assert_error(
        &server
            .post_json(&path, Some(&ana), json!({"vote": "sideways"}))
            .await,
        400,
        "validation_error",
    );
    assert_error(
        &server
            .post_json(&path, Some(&leo), json!({"vote": "up"}))
            .await,
        404,
        "not_found",
    );

    assert_error(
        &server.get("/review/queue", Some(&ana)).await,
        403,
        "forbidden",
    );
    let queue = server.get("/review/queue", Some(&admin)).await;
    assert_eq!(queue.0, 200, "{queue:?}");
    let items = queue.1["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{queue:?}");
    assert_eq!(items[0]["reasons"], json!(["thumbs_down"]));
    assert_eq!(items[0]["messageId"], message.as_str());
    let item = items[0]["id"].as_str().unwrap().to_owned();
    let opened = server
        .get(&format!("/review/queue/{item}?around=1"), Some(&admin))
        .await;
    assert_eq!(opened.0, 200, "{opened:?}");
    assert_eq!(opened.1["messages"].as_array().unwrap().len(), 2);
    assert_eq!(opened.1["messages"][0]["content"], "do you purr?");
    assert_error(
        &server
            .get(&format!("/review/queue/{item}"), Some(&ana))
            .await,
        403,
        "forbidden",
    );
    assert_error(
        &server.get("/review/queue/not-an-item", Some(&admin)).await,
        400,
        "validation_error",
    );
    let reviewed_path = format!("/review/queue/{item}/reviewed");
    let marked = server
        .post_json(
            &reviewed_path,
            Some(&admin),
            json!({"note": "they do, a little"}),
        )
        .await;
    assert_eq!(marked.0, 200, "{marked:?}");
    assert_eq!(marked.1["review"]["by"], "user_admin");
    assert_error(
        &server
            .post_json(&reviewed_path, Some(&admin), json!({}))
            .await,
        404,
        "not_found",
    );
    let reviewed = server
        .get("/review/queue?state=reviewed", Some(&admin))
        .await;
    assert_eq!(reviewed.1["items"][0]["id"], item.as_str());
    assert!(
        server.get("/review/queue", Some(&admin)).await.1["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    server.turn(&leo, "cougar", "hello", None).await;
    let usage = server.get("/usage?groupBy=user,animal", Some(&admin)).await;
    assert_eq!(usage.0, 200, "{usage:?}");
    let rows = usage.1["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{usage:?}");
    assert_eq!(usage.1["total"]["turns"], 2);
    assert_eq!(usage.1["total"]["promptTokens"], 20);
    assert!(rows.iter().any(|r| r["userId"] == "user_student_ana"
        && r["animalId"] == "cougar"
        && r["totalTokens"] == 15));
    let csv = server
        .client
        .get(server.url("/usage?groupBy=user&format=csv"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await.unwrap();
    assert!(text.starts_with("day,familyId,userId,"), "{text}");
    assert!(text.contains(",user_student_leo,,,10,5,15,1,0\n"), "{text}");
    assert_error(&server.get("/usage", Some(&ana)).await, 403, "forbidden");
    assert_error(
        &server.get("/usage?from=yesterday", Some(&admin)).await,
        400,
        "validation_error",
    );
    assert_error(
        &server.get("/usage?groupBy=week", Some(&admin)).await,
        400,
        "validation_error",
    );
}

/// A turn over a daily token budget is a 429 with the budget, what is used, when it resets
/// and `Retry-After`; nothing is stored for it.
#[tokio::test]
async fn a_turn_over_the_daily_token_budget_is_refused_with_the_budget() {
    let server = start_budgeted(
        ScriptedModel::echo(),
        HttpSettings::default(),
        cmz_tower::sample_personas(),
        50,
        Budgets {
            user: Some(20),
            ..Budgets::default()
        },
    )
    .await;
    let ana = server.login("student1@cmz.org", "student123").await;
    let first = server.turn(&ana, "cougar", "one", None).await;
    assert_eq!(first.0, 200, "{first:?}");
    assert_eq!(
        first.1["rateLimit"]["tokenBudgets"],
        json!([{"scope": "user", "budget": 20, "used": 15, "resetsAt": first.1["rateLimit"]["tokenBudgets"][0]["resetsAt"]}])
    );
    let session = first.1["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(
        server.turn(&ana, "cougar", "two", Some(&session)).await.0,
        200
    );
    let response = server
        .client
        .post(server.url("/convo_turn"))
        .bearer_auth(&ana)
        .header("content-type", "application/json")
        .body(json!({"animalId": "cougar", "message": "three", "sessionId": session}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&wait));
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["code"], "rate_limit_exceeded");
    assert_eq!(body["details"]["budget"], "user");
    assert_eq!(body["details"]["limit"], 20);
    assert_eq!(body["details"]["used"], 30);
    assert!(
        body["details"]["resetTime"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );
    let history = server
        .get(&format!("/convo_history?sessionId={session}"), Some(&ana))
        .await;
    assert_eq!(
        history.1["turns"].as_array().unwrap().len(),
        4,
        "nothing stored"
    );
    // The stream refuses alike, before any event.
    let stream = server
        .get(
            &format!("/convo_turn/stream?animalId=cougar&message=hi&token={ana}"),
            None,
        )
        .await;
    assert_error(&stream, 429, "rate_limit_exceeded");
    // Another child has a budget of their own.
    let leo = server.login("student2@cmz.org", "student123").await;
    assert_eq!(server.turn(&leo, "cougar", "hi", None).await.0, 200);
}

/// A browser that loses the connection mid-reply reconnects with `Last-Event-ID` (as
/// EventSource does by itself) and gets every event it missed exactly once, then the rest;
/// the turn went on meanwhile and is stored whole. A stop cancels at once.
#[tokio::test]
async fn a_dropped_stream_is_resumed_with_last_event_id_and_a_stop_cancels_it() {
    let model = ScriptedModel::always("one two three four five six seven eight nine ten")
        .with_chunk_delay(Duration::from_millis(30));
    let config = ConversationConfig {
        stream_resume_grace: Duration::from_secs(5),
        ..ConversationConfig::default()
    };
    let server = start_with_config(model, config).await;
    let token = server.login("student1@cmz.org", "student123").await;
    let url = server.url(&format!(
        "/convo_turn/stream?animalId=cougar&message=story&token={token}"
    ));
    let open = |last: Option<String>| {
        let mut request = server
            .client
            .get(&url)
            .header("accept", "text/event-stream");
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        request.send()
    };
    let response = open(None).await.unwrap();
    let mut events = response.bytes_stream().eventsource();
    let mut text = String::new();
    let (mut last_id, mut session) = (String::new(), String::new());
    let mut pieces = 0;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        assert!(!event.id.is_empty(), "every event has an id: {event:?}");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        if event.event == "metadata" {
            let stream_id = data["streamId"].as_str().unwrap();
            session = data["sessionId"].as_str().unwrap().to_owned();
            assert_eq!(event.id, format!("{stream_id}.0"));
        }
        if event.event == "message" {
            text.push_str(data["content"].as_str().unwrap());
            last_id = event.id.clone();
            pieces += 1;
            if pieces == 3 {
                break;
            }
        }
    }
    drop(events);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = open(Some(last_id.clone())).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let mut complete = Value::Null;
    let mut numbers = Vec::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        assert_ne!(
            event.event, "metadata",
            "a resumed stream does not start again"
        );
        numbers.push(event.id.rsplit_once('.').unwrap().1.parse::<u64>().unwrap());
        let data: Value = serde_json::from_str(&event.data).unwrap();
        match event.event.as_str() {
            "message" => text.push_str(data["content"].as_str().unwrap()),
            "complete" => complete = data,
            other => panic!("unexpected {other}: {data}"),
        }
    }
    assert_eq!(numbers[0], 4, "the first event after {last_id}");
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    assert_eq!(complete["interrupted"], false, "the turn went on meanwhile");
    assert_eq!(text, "one two three four five six seven eight nine ten");
    assert_eq!(complete["fullResponse"], text.as_str());
    let history = server
        .get(&format!("/convo_history?sessionId={session}"), Some(&token))
        .await;
    assert_eq!(
        history.1["turns"][1]["content"],
        text.as_str(),
        "stored once, whole"
    );
    assert_eq!(
        history.1["turns"].as_array().unwrap().len(),
        2,
        "no second turn"
    );

    // Another user cannot resume it; a malformed id or an unknown stream is a 404.
    let other = server.login("student2@cmz.org", "student123").await;
    let foreign = server
        .client
        .get(server.url(&format!(
            "/convo_turn/stream?animalId=cougar&message=x&token={other}"
        )))
        .header("accept", "text/event-stream")
        .header("last-event-id", last_id.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);
    let bad = open(Some("garbage".into())).await.unwrap();
    assert_eq!(
        bad.status(),
        404,
        "an id this server never sends names no stream"
    );

    // A stop cancels at once; the reply so far is stored, marked interrupted.
    let response = open(None).await.unwrap();
    let mut events = response.bytes_stream().eventsource();
    let mut second = (String::new(), String::new());
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let data: Value = serde_json::from_str(&event.data).unwrap();
        if event.event == "metadata" {
            second = (
                data["streamId"].as_str().unwrap().to_owned(),
                data["sessionId"].as_str().unwrap().to_owned(),
            );
        }
        if event.event == "message" {
            break;
        }
    }
    let stopped = server
        .post_json(
            &format!("/convo_turn/stream/{}/stop", second.0),
            Some(&other),
            json!({}),
        )
        .await;
    assert_eq!(stopped.0, 404, "only the owner stops it");
    let stopped = server
        .post_json(
            &format!("/convo_turn/stream/{}/stop", second.0),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!(stopped.0, 204, "{stopped:?}");
    let mut ended = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.event == "error" {
            ended = Some(event.data);
        }
    }
    assert!(ended.is_some(), "the reader learns it was stopped");
    for _ in 0..100 {
        let history = server
            .get(
                &format!("/convo_history?sessionId={}&includeMetadata=true", second.1),
                Some(&token),
            )
            .await;
        if history.0 == 200 && history.1["turns"].as_array().unwrap().len() == 2 {
            assert_eq!(history.1["turns"][1]["metadata"]["interrupted"], true);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the stopped turn was not stored");
}
