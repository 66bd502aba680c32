//! The HTTP API on the DynamoDB stores (feature `dynamo`), built from the environment as
//! the demo server builds it, over real loopback HTTP against DynamoDB Local.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use serde_json::{Value, json};

struct Server {
    base: String,
    client: reqwest::Client,
}

fn environment(extra: &[(&str, &str)]) -> HashMap<String, String> {
    support::dynamo_environment(extra)
}

async fn start(env: &HashMap<String, String>) -> Server {
    let state = cmz_tower::state_from_env(&|name| env.get(name).cloned())
        .await
        .expect("state on DynamoDB");
    Server {
        base: support::serve(cmz_tower::router(state)).await,
        client: reqwest::Client::new(),
    }
}

impl Server {
    async fn call(&self, request: reqwest::RequestBuilder, token: Option<&str>) -> (u16, Value) {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(self.client.get(format!("{}{path}", self.base)), Some(token))
            .await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.call(
            self.client
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body.to_string()),
            token,
        )
        .await
    }

    async fn login(&self, email: &str, password: &str) -> String {
        let (status, body) = self
            .post(
                "/auth",
                None,
                json!({"username": email, "password": password}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    async fn turn(&self, token: &str, animal: &str, message: &str) -> (u16, Value) {
        self.post(
            "/convo_turn",
            Some(token),
            json!({"animalId": animal, "message": message}),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_checklist_and_the_policy_on_dynamodb() {
    let server = start(&environment(&[])).await;
    let admin = server.login("admin@cmz.org", "admin123").await;
    let (status, families) = server.get("/family_list", &admin).await;
    assert_eq!(status, 200);
    assert_eq!(families.as_array().unwrap().len(), 2, "{families}");
    let (status, turn) = server.turn(&admin, "porcupine", "Hello Pokey!").await;
    assert_eq!(status, 200, "{turn}");
    let session = turn["sessionId"].as_str().unwrap().to_owned();
    let (status, history) = server
        .get(&format!("/convo_history?sessionId={session}"), &admin)
        .await;
    assert_eq!(status, 200);
    let turns = history["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0]["content"], "Hello Pokey!");
    assert_eq!(turns[1]["content"], turn["reply"]);

    // A student's conversation: their parent reads it, another family's user does not.
    let student = server.login("student1@cmz.org", "student123").await;
    let (_, turn) = server.turn(&student, "cougar", "Can you roar?").await;
    let session = turn["sessionId"].as_str().unwrap().to_owned();
    let parent = server.login("parent@cmz.org", "parent123").await;
    let other = server.login("other@cmz.org", "other123").await;
    assert_eq!(
        server
            .get(&format!("/convo_history?sessionId={session}"), &parent)
            .await
            .0,
        200
    );
    assert_eq!(
        server
            .get(&format!("/convo_history?sessionId={session}"), &other)
            .await
            .0,
        404,
        "another family's session answers like an unknown one"
    );
    let (status, sessions) = server.get("/conversations/sessions", &student).await;
    assert_eq!(status, 200);
    assert_eq!(sessions["sessions"][0]["sessionId"], session.as_str());

    // Logout revokes the token in the shared revocation store.
    let (status, _) = server.post("/auth/logout", Some(&other), json!({})).await;
    assert_eq!(status, 204);
    assert_eq!(server.get("/me", &other).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_way_is_stored_interrupted_in_dynamodb() {
    // No grace period: the client going away cancels the turn at once.
    let server = start(&environment(&[
        ("CMZ_OFFLINE_CHUNK_DELAY_MS", "40"),
        ("CMZ_STREAM_RESUME_GRACE_MS", "0"),
    ]))
    .await;
    let token = server.login("student1@cmz.org", "student123").await;
    let response = server
        .client
        .get(format!(
            "{}/convo_turn/stream?animalId=cougar&message=tell+me+a+story&token={token}",
            server.base
        ))
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
        let (status, history) = server
            .get(
                &format!("/convo_history?sessionId={session}&includeMetadata=true"),
                &token,
            )
            .await;
        if status == 200 {
            turns = history["turns"].as_array().unwrap().clone();
            if turns.len() == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(turns.len(), 2, "the turn was stored");
    assert_eq!(turns[1]["metadata"]["interrupted"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_limit_holds_across_two_servers_sharing_the_tables() {
    let env = environment(&[("CMZ_TURN_RATE_LIMIT", "3")]);
    let (a, b) = (start(&env).await, start(&env).await);
    let token = a.login("student2@cmz.org", "student123").await;
    assert_eq!(a.turn(&token, "cougar", "one").await.0, 200);
    assert_eq!(b.turn(&token, "cougar", "two").await.0, 200);
    assert_eq!(a.turn(&token, "cougar", "three").await.0, 200);
    let (status, body) = b.turn(&token, "cougar", "four").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limit_exceeded");
    assert_eq!(body["details"]["limit"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_named_at_startup() {
    let mut env = environment(&[]);
    start(&env).await;
    // The legacy team's typo: a plural table name that does not exist.
    env.remove("CMZ_DYNAMODB_CREATE_TABLES");
    let real = env["CONVERSATION_SESSION_TABLE_NAME"].clone();
    env.insert("CONVERSATION_SESSION_TABLE_NAME".into(), format!("{real}s"));
    let error = cmz_tower::state_from_env(&|name| env.get(name).cloned())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert_eq!(error.code(), "validation_error");
    assert!(
        message.contains(&format!("{real}s"))
            && message.contains("CONVERSATION_SESSION_TABLE_NAME"),
        "{message}"
    );
    assert!(
        message.contains(&format!("similar names: {real}")),
        "{message}"
    );
    // With the right name it starts.
    env.insert("CONVERSATION_SESSION_TABLE_NAME".into(), real);
    assert!(
        cmz_tower::state_from_env(&|name| env.get(name).cloned())
            .await
            .is_ok()
    );
}

/// An erasure leaves nothing behind: after it, no item of any cmz table mentions the child
/// (id, email) or anything they said, except the tombstone that keeps running turns from
/// writing back (it holds the id and a time, no content). Other children's data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_leaves_nothing_in_any_table() {
    let env = environment(&[]);
    let server = start(&env).await;
    let login = |email: &'static str, password: &'static str| {
        let server = &server;
        async move {
            let body = server
                .post(
                    "/auth",
                    None,
                    json!({"username": email, "password": password}),
                )
                .await;
            assert_eq!(body.0, 200, "{body:?}");
            (
                body.1["token"].as_str().unwrap().to_owned(),
                body.1["refreshToken"].as_str().map(str::to_owned),
            )
        }
    };
    let (leo, refresh) = login("student2@cmz.org", "student123").await;
    let (ana, _) = login("student1@cmz.org", "student123").await;
    let (parent, _) = login("parent@cmz.org", "parent123").await;
    // A failed login leaves a throttle counter too.
    let wrong = server
        .post(
            "/auth",
            None,
            json!({"username": "student2@cmz.org", "password": "nope"}),
        )
        .await;
    assert_eq!(wrong.0, 401);
    let said = "my hamster Zorblax-7781 loves seeds";
    let mut session: Option<String> = None;
    for n in 0..12 {
        let mut body = json!({"animalId": "cougar", "message": format!("{said} ({n})")});
        if let Some(id) = &session {
            body["sessionId"] = id.clone().into();
        }
        let reply = server.post("/convo_turn", Some(&leo), body).await;
        assert_eq!(reply.0, 200, "{reply:?}");
        session = reply.1["sessionId"].as_str().map(str::to_owned);
    }
    server
        .post(
            "/convo_turn",
            Some(&ana),
            json!({"animalId": "cougar", "message": "Ana keeps this"}),
        )
        .await;
    let settings = cmz_dynamo::DynamoSettings::from_env(|n| env.get(n).cloned()).unwrap();
    let mentions = |items: &[(String, Value)], needle: &str| -> Vec<String> {
        items
            .iter()
            .filter(|(_, item)| item.to_string().contains(needle))
            .map(|(table, item)| format!("{table}: {item}"))
            .collect()
    };
    let before = cmz_dynamo::testing::scan_all_tables(&settings).await;
    assert!(
        mentions(&before, "Zorblax").len() >= 6,
        "the turns are stored"
    );
    assert!(!mentions(&before, "user_student_leo").is_empty());

    let erased = server
        .call(
            server.client.delete(format!(
                "{}/users/user_student_leo/data?reason=test",
                server.base
            )),
            Some(&parent),
        )
        .await;
    assert_eq!(erased.0, 200, "{erased:?}");
    assert_eq!(erased.1["sessions"], 1);
    assert_eq!(erased.1["messages"], 24);
    assert_eq!(erased.1["account"], true);

    let after = cmz_dynamo::testing::scan_all_tables(&settings).await;
    assert!(
        mentions(&after, "Zorblax").is_empty(),
        "{:#?}",
        mentions(&after, "Zorblax")
    );
    assert!(
        mentions(&after, "student2@cmz.org").is_empty(),
        "{:#?}",
        mentions(&after, "student2@cmz.org")
    );
    let left: Vec<String> = mentions(&after, "user_student_leo")
        .into_iter()
        .filter(|item| !item.contains("deletedAt"))
        .collect();
    assert!(
        left.is_empty(),
        "only tombstones may name the child: {left:#?}"
    );
    // The tombstones hold no content: keys, a time, an expiry.
    for (_, item) in after
        .iter()
        .filter(|(_, i)| i.to_string().contains("user_student_leo"))
    {
        let keys: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert!(keys.len() <= 4, "a tombstone with content: {item}");
    }
    assert!(
        !mentions(&after, "Ana keeps this").is_empty(),
        "other children's data stays"
    );
    // No way back in: no login, no refresh.
    let again = server
        .post(
            "/auth",
            None,
            json!({"username": "student2@cmz.org", "password": "student123"}),
        )
        .await;
    assert_eq!(again.0, 401);
    if let Some(refresh) = refresh {
        let renewed = server
            .post("/auth/refresh", None, json!({"refreshToken": refresh}))
            .await;
        assert_eq!(renewed.0, 401);
    }
}

/// A family that keeps conversations only until they end: its parent says so over HTTP,
/// and the retention sweep deletes its children's ended conversations on DynamoDB, and
/// nobody else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_familys_retention_is_applied() {
    use cmz_core::ids::{AnimalId, SessionId, UserId};
    use cmz_core::store::{ConversationStore, TurnAppend};
    use cmz_core::types::{NewMessage, Role, Session};

    let env = environment(&[]);
    let server = start(&env).await;
    let parent = server.login("parent@cmz.org", "parent123").await;
    let set = server
        .call(
            server
                .client
                .put(format!("{}/families/family_rivera/retention", server.base))
                .header("content-type", "application/json")
                .body(json!({"days": 0}).to_string()),
            Some(&parent),
        )
        .await;
    assert_eq!(set.0, 200, "{set:?}");
    assert_eq!(set.1["retentionDays"], 0);
    let listed = server.get("/family_list", &parent).await;
    assert_eq!(listed.1[0]["retentionDays"], 0, "{listed:?}");

    // An ended conversation (an hour old) of each family's child, and a current one.
    let settings = cmz_dynamo::DynamoSettings::from_env(|n| env.get(n).cloned()).unwrap();
    let store = cmz_dynamo::Dynamo::connect(settings).await.conversations();
    let hour_ago = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    let mut sessions = Vec::new();
    for (user, at) in [
        ("user_student_ana", hour_ago),
        ("user_student_kim", hour_ago),
        ("user_student_leo", chrono::Utc::now()),
    ] {
        let (user, animal) = (UserId::new(user).unwrap(), AnimalId::new("cougar").unwrap());
        let mut session = Session::new(
            SessionId::generate(&animal, &user).unwrap(),
            user,
            animal,
            "Cora",
        );
        session.started_at = at;
        session.last_activity = at;
        let mut messages = vec![
            NewMessage::new(Role::User, "hi"),
            NewMessage::new(Role::Assistant, "hello"),
        ];
        for m in &mut messages {
            m.created_at = at;
        }
        store
            .append_turn(TurnAppend {
                session_id: session.id.clone(),
                expected_count: 0,
                messages,
                turn_key: None,
                new_session: Some(session.clone()),
                began_at: chrono::Utc::now(),
            })
            .await
            .unwrap();
        sessions.push(session.id);
    }
    let services = cmz_env::services_from_env(&|n| env.get(n).cloned())
        .await
        .unwrap();
    let report = services
        .apply_family_retention(chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(
        (report.families, report.sessions, report.messages),
        (1, 1, 2)
    );
    let kept: Vec<bool> =
        futures::future::join_all(sessions.iter().map(|id| store.get_session(id)))
            .await
            .into_iter()
            .map(|s| s.unwrap().is_some())
            .collect();
    assert_eq!(
        kept,
        [false, true, true],
        "Ana's ended one goes; Kim's family chose nothing; Leo's is current"
    );
    // Only the family's parents choose.
    let kim = server.login("other@cmz.org", "other123").await;
    let refused = server
        .call(
            server
                .client
                .put(format!("{}/families/family_rivera/retention", server.base))
                .header("content-type", "application/json")
                .body(json!({"days": null}).to_string()),
            Some(&kim),
        )
        .await;
    assert_eq!(refused.0, 403);
}

/// Two servers share one family's daily token budget through DynamoDB: turns on either
/// count, the one that starts over it is refused on the other, with the budget's details;
/// feedback given on one server is in the queue read on the other, and usage is counted
/// once per turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_family_budget_the_review_queue_and_usage() {
    let env = environment(&[("CMZ_DAILY_TOKEN_BUDGET_FAMILY", "1")]);
    let (a, b) = (start(&env).await, start(&env).await);
    let ana = a.login("student1@cmz.org", "student123").await;
    let leo = b.login("student2@cmz.org", "student123").await;
    let admin = a.login("admin@cmz.org", "admin123").await;
    let first = a.turn(&ana, "cougar", "hello").await;
    assert_eq!(first.0, 200, "{first:?}");
    let budget = &first.1["rateLimit"]["tokenBudgets"][0];
    assert_eq!(budget["scope"], "family");
    assert!(budget["used"].as_u64().unwrap() >= 1);
    // Leo is in the same family: his turn on the other server starts over the budget.
    let (status, body) = b.turn(&leo, "cougar", "hi").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["details"]["budget"], "family");
    assert_eq!(body["details"]["limit"], 1);
    // Kim's family is not affected.
    let kim = b.login("other@cmz.org", "other123").await;
    assert_eq!(b.turn(&kim, "porcupine", "hi").await.0, 200);

    let session = first.1["sessionId"].as_str().unwrap();
    let message = first.1["turnId"].as_str().unwrap();
    let voted = b
        .post(
            &format!("/conversations/sessions/{session}/messages/{message}/feedback"),
            Some(&ana),
            json!({"vote": "down", "note": "too short"}),
        )
        .await;
    assert_eq!(voted.0, 200, "{voted:?}");
    let queue = a.get("/review/queue", &admin).await;
    assert_eq!(queue.0, 200, "{queue:?}");
    assert_eq!(queue.1["items"][0]["reasons"], json!(["thumbs_down"]));
    let item = queue.1["items"][0]["id"].as_str().unwrap();
    let marked = b
        .post(
            &format!("/review/queue/{item}/reviewed"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(marked.0, 200, "{marked:?}");
    let usage = b.get("/usage?groupBy=family,user", &admin).await;
    assert_eq!(usage.0, 200, "{usage:?}");
    assert_eq!(usage.1["total"]["turns"], 2, "{usage:?}");
    assert!(
        usage.1["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["familyId"] == "family_rivera"
                && r["userId"] == "user_student_ana"
                && r["turns"] == 1)
    );
}
