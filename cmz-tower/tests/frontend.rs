//! The legacy React frontend's requests, replayed as its pages send them (the
//! `reference/LEGACY-REAL.md` section "What the real React frontend sends and reads"):
//! cross-origin from its development server, with the browser's CORS preflights, the
//! headers and bodies the pages build, the chat's made-up `session_<milliseconds>` id and
//! the animal list without an `Authorization` header. Every field the pages read is
//! checked, on the demo stack (built from the environment as the demo builds it) over the
//! in-memory stores and over DynamoDB Local.

mod support;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

/// Where the legacy frontend's Vite development server serves the page from (port 3000,
/// its default); the pages call the API on `http://localhost:8080` from there.
const ORIGIN: &str = "http://localhost:3000";

/// A page in a browser at [`ORIGIN`], calling the API cross-origin.
struct Page {
    base: String,
    client: reqwest::Client,
}

/// What a page's `fetch` got back.
#[derive(Debug)]
struct Fetched {
    status: u16,
    body: Value,
}

/// Request headers a browser sends without a preflight (the CORS-safelisted ones, for the
/// values these pages use).
fn safelisted(name: &str, value: &str) -> bool {
    name.eq_ignore_ascii_case("accept")
        || (name.eq_ignore_ascii_case("content-type") && value == "text/plain")
}

impl Page {
    fn new(base: String) -> Self {
        Self {
            base,
            client: reqwest::Client::new(),
        }
    }

    /// `fetch(url, {method, headers, body})` as Chromium runs it cross-origin: first the
    /// preflight when the request is not a simple one (it is not when it sets
    /// `Authorization` or `Content-Type: application/json`), checked as the browser
    /// checks it, then the request with its `Origin`, whose response must allow the origin
    /// (or the page could not read it).
    async fn fetch(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Fetched {
        let url = format!("{}{path}", self.base);
        let mut unsafe_headers: Vec<String> = headers
            .iter()
            .filter(|(name, value)| !safelisted(name, value))
            .map(|(name, _)| name.to_ascii_lowercase())
            .collect();
        unsafe_headers.sort();
        let simple_method = matches!(method, "GET" | "HEAD" | "POST");
        if !simple_method || !unsafe_headers.is_empty() {
            let mut preflight = self
                .client
                .request(reqwest::Method::OPTIONS, &url)
                .header("origin", ORIGIN)
                .header("access-control-request-method", method);
            if !unsafe_headers.is_empty() {
                preflight =
                    preflight.header("access-control-request-headers", unsafe_headers.join(","));
            }
            let response = preflight.send().await.unwrap();
            let status = response.status().as_u16();
            let allowed = response.headers();
            assert!(
                (200..300).contains(&status),
                "preflight of {method} {path}: {status}"
            );
            assert_eq!(
                allowed
                    .get("access-control-allow-origin")
                    .and_then(|v| v.to_str().ok()),
                Some(ORIGIN),
                "preflight of {method} {path}: {allowed:?}"
            );
            let list = |name: &str| {
                allowed
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .split(',')
                    .map(|v| v.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            };
            if !simple_method {
                assert!(
                    list("access-control-allow-methods").contains(&method.to_ascii_lowercase()),
                    "preflight of {method} {path}: {allowed:?}"
                );
            }
            let allowed_headers = list("access-control-allow-headers");
            for header in &unsafe_headers {
                assert!(
                    allowed_headers.contains(header),
                    "preflight of {method} {path} does not allow {header}: {allowed:?}"
                );
            }
        }
        let mut request = self
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                &url,
            )
            .header("origin", ORIGIN);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let allowed = response
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.unwrap();
        assert_eq!(
            allowed.as_deref(),
            Some(ORIGIN),
            "{method} {path} ({status}): the page could not read the response"
        );
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{method} {path} ({status}): not JSON: {text}"))
        };
        Fetched { status, body }
    }

    /// The login form (`authApi.login`): `apiRequest('/auth', {method: 'POST', body})`.
    async fn login(&self, email: &str, password: &str) -> (String, Value) {
        let body = format!(r#"{{"username":"{email}","password":"{password}"}}"#);
        let login = self
            .fetch(
                "POST",
                "/auth",
                &[("Content-Type", "application/json")],
                Some(&body),
            )
            .await;
        assert_eq!(login.status, 200, "{login:?}");
        let token = login.body["token"].as_str().expect("token").to_owned();
        assert!(login.body["expiresIn"].as_u64().unwrap() > 0, "{login:?}");
        assert!(login.body["user"]["name"].is_string(), "{login:?}");
        // The page takes the user from the token's claims (`getUserFromToken`).
        let claims = claims(&token);
        for claim in ["user_id", "email", "role", "user_type"] {
            assert!(claims[claim].is_string(), "{claim} in {claims}");
        }
        assert!(claims["exp"].as_i64().unwrap() > Utc::now().timestamp());
        (token, claims)
    }
}

/// The payload of a JWT, decoded as the page's `decodeJWT` does (no verification).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let mut bits = 0u32;
    let mut count = 0;
    let mut bytes = Vec::new();
    for c in payload.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => continue,
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    serde_json::from_slice(&bytes).expect("JSON claims")
}

/// `new Date(value)` gives a valid date (an invalid one crashes the history page).
fn date(value: &Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a date: {value}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|_| panic!("not a date: {text}"))
        .with_timezone(&Utc)
}

/// `new Date().toISOString()`, as the history page puts it in a query string.
fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        .replace(':', "%3A")
}

/// `session_${Date.now()}`.
fn made_up_session_id(offset: i64) -> String {
    format!("session_{}", Utc::now().timestamp_millis() + offset)
}

/// The chat page (`ChatService.sendMessage`): `POST /convo_turn` with the body the page
/// builds, key order and all.
async fn send_message(
    page: &Page,
    token: &str,
    message: &str,
    animal: &str,
    session: &str,
) -> Fetched {
    let body = format!(
        r#"{{"message":"{message}","animalId":"{animal}","sessionId":"{session}","userId":"frontend_user"}}"#
    );
    let auth = format!("Bearer {token}");
    page.fetch(
        "POST",
        "/convo_turn",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        Some(&body),
    )
    .await
}

/// What the chat page reads from a reply; returns the session id it keeps.
fn read_reply(reply: &Fetched, session: &str) -> String {
    assert_eq!(reply.status, 200, "{reply:?}");
    let body = &reply.body;
    let text = body["response"].as_str().or(body["reply"].as_str());
    assert!(text.is_some_and(|t| !t.is_empty()), "{body}");
    let kept = body["conversationId"]
        .as_str()
        .or(body["sessionId"].as_str())
        .unwrap();
    assert_eq!(kept, session, "the page keeps the id it made up");
    assert!(body["turnId"].as_str().is_some_and(|t| !t.is_empty()));
    date(&body["timestamp"]);
    kept.to_owned()
}

/// A listing entry as the history page (`ChatHistory`) and the family view read it.
fn check_listed(entry: &Value) {
    for field in ["sessionId", "userId", "animalId", "animalName", "userName"] {
        assert!(entry[field].is_string(), "{field} in {entry}");
    }
    let when = entry
        .get("timestamp")
        .filter(|v| !v.is_null())
        .or(entry.get("createdAt"))
        .unwrap();
    date(when);
    assert!(entry["messageCount"].as_u64().unwrap() > 0, "{entry}");
    assert!(
        matches!(
            entry["status"].as_str(),
            Some("active" | "completed" | "archived")
        ),
        "{entry}"
    );
    assert!(entry["lastMessage"].is_string(), "{entry}");
}

/// Every request of the frontend section, in the order a visitor, a child and a parent
/// make them.
async fn replay(base: String) {
    let page = Page::new(base);

    // The chat page checks the backend before anyone logged in: an empty bearer token.
    let health = page
        .fetch(
            "GET",
            "/system_health",
            &[("Authorization", "Bearer ")],
            None,
        )
        .await;
    assert!((200..300).contains(&health.status), "{health:?}");

    // The first screen (`PublicAnimalList`): no Authorization header at all.
    let list = page.fetch("GET", "/animal_list", &[], None).await;
    assert_eq!(list.status, 200, "{list:?}");
    let animals = list.body.as_array().expect("a bare array").clone();
    assert!(!animals.is_empty());
    for animal in &animals {
        for field in ["animalId", "name", "species", "personality"] {
            assert!(
                animal[field].as_str().is_some_and(|v| !v.is_empty()),
                "{field} in {animal}"
            );
        }
        assert_eq!(animal["status"], "active", "only offered animals: {animal}");
    }
    let animal = animals[0]["animalId"].as_str().unwrap().to_owned();
    // The details page.
    let details = page
        .fetch("GET", &format!("/animal/{animal}"), &[], None)
        .await;
    assert_eq!(details.status, 200, "{details:?}");
    assert_eq!(details.body, animals[0]);

    // A child logs in and chats.
    let (token, claims) = page.login("student1@cmz.org", "student123").await;
    let auth = format!("Bearer {token}");
    // The staff animal page sends its token and a content type with the same list.
    let staff_list = page
        .fetch(
            "GET",
            "/animal_list",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            None,
        )
        .await;
    assert_eq!(staff_list.body, list.body);
    let health = page
        .fetch("GET", "/system_health", &[("Authorization", &auth)], None)
        .await;
    assert!((200..300).contains(&health.status), "{health:?}");

    // A new chat: the page makes the session id up, then keeps it.
    let session = made_up_session_id(0);
    let first = send_message(&page, &token, "Hello! What do you eat?", &animal, &session).await;
    let kept = read_reply(&first, &session);
    assert_eq!(first.body["animalId"], animal.as_str());
    let second = send_message(&page, &token, "Can you climb trees?", &animal, &kept).await;
    read_reply(&second, &session);
    // The chat opened without an animal.
    let other = made_up_session_id(1);
    let default = send_message(&page, &token, "Hi there!", "default", &other).await;
    read_reply(&default, &other);
    assert!(
        animals
            .iter()
            .any(|a| a["animalId"] == default.body["animalId"]),
        "`default` stands for an offered animal: {default:?}"
    );
    let again = send_message(&page, &token, "Who are you?", "default", &other).await;
    read_reply(&again, &other);

    // `ChatService.getConversationHistory`.
    let history = page
        .fetch(
            "GET",
            &format!("/convo_history?sessionId={session}"),
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(history.status, 200, "{history:?}");

    // The history page: no filters (an empty query string), then a date range.
    let listing = page
        .fetch(
            "GET",
            "/conversations/sessions?",
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(listing.status, 200, "{listing:?}");
    let sessions = listing.body["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{listing:?}");
    for entry in sessions {
        check_listed(entry);
        assert_eq!(entry["userId"], claims["user_id"]);
        assert_eq!(entry["userName"], "Ana Rivera");
    }
    let chat = sessions
        .iter()
        .find(|s| s["sessionId"] == session.as_str())
        .expect("the made-up session is listed");
    assert_eq!(chat["messageCount"], 4);
    assert_eq!(chat["lastMessage"], second.body["reply"]);
    let now = Utc::now();
    let ranged = page
        .fetch(
            "GET",
            &format!(
                "/conversations/sessions?startDate={}&endDate={}",
                iso(now - chrono::Duration::days(1)),
                iso(now + chrono::Duration::days(1))
            ),
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(ranged.body["sessions"].as_array().unwrap().len(), 2);

    // The conversation viewer.
    let viewer = page
        .fetch(
            "GET",
            &format!("/conversations/sessions/{session}"),
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(viewer.status, 200, "{viewer:?}");
    let messages = viewer.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(messages[0]["content"], "Hello! What do you eat?");
    assert_eq!(messages[1]["content"], first.body["reply"]);
    for message in messages {
        date(&message["timestamp"]);
        assert!(
            message["tokensUsed"].is_null() || message["tokensUsed"].is_u64(),
            "{message}"
        );
    }
    let info = &viewer.body["sessionInfo"];
    assert_eq!(info["animalId"], animal.as_str());
    assert_eq!(info["animalName"], chat["animalName"]);
    assert!(date(&info["createdAt"]) <= date(&info["updatedAt"]));

    // The next child at the same browser: logging out leaves the chat's session id in
    // the page's storage, and her first message goes out with it. She gets a
    // conversation of her own under a new id, which the page adopts; ana's is neither
    // shown to her nor changed.
    let page_of_kim = Page::new(page.base.clone());
    let (kim, _) = page_of_kim.login("other@cmz.org", "other123").await;
    let kims = send_message(&page_of_kim, &kim, "Hi!", &animal, &session).await;
    assert_eq!(kims.status, 200, "{kims:?}");
    let kims_session = kims.body["sessionId"].as_str().unwrap().to_owned();
    assert_ne!(kims_session, session);
    assert!(!kims.body.to_string().contains("Hello! What do you eat?"));
    let next = send_message(&page_of_kim, &kim, "Do you sleep?", &animal, &kims_session).await;
    read_reply(&next, &kims_session);
    assert_eq!(next.body["turnNumber"], 2);
    let kim_auth = format!("Bearer {kim}");
    let kims_listing = page_of_kim
        .fetch(
            "GET",
            "/conversations/sessions?",
            &[("Authorization", &kim_auth)],
            None,
        )
        .await;
    let kims_sessions = kims_listing.body["sessions"].as_array().unwrap();
    assert_eq!(kims_sessions.len(), 1, "{kims_listing:?}");
    check_listed(&kims_sessions[0]);
    assert_eq!(kims_sessions[0]["sessionId"], kims_session.as_str());
    assert_eq!(kims_sessions[0]["messageCount"], 4);
    let peek = page_of_kim
        .fetch(
            "GET",
            &format!("/conversations/sessions/{session}"),
            &[("Authorization", &kim_auth)],
            None,
        )
        .await;
    assert_eq!(peek.status, 404, "{peek:?}");
    assert_eq!(peek.body["code"], "not_found");

    // The parent's family view.
    let (parent, parent_claims) = page.login("parent@cmz.org", "parent123").await;
    let parent_auth = format!("Bearer {parent}");
    let family = page
        .fetch(
            "GET",
            &format!(
                "/convo_history?parentUserId={}",
                parent_claims["user_id"].as_str().unwrap()
            ),
            &[("Authorization", &parent_auth)],
            None,
        )
        .await;
    assert_eq!(family.status, 200, "{family:?}");
    let family_sessions = family.body["sessions"].as_array().unwrap();
    assert_eq!(family_sessions.len(), 2, "{family:?}");
    for entry in family_sessions {
        check_listed(entry);
        assert_eq!(entry["userName"], "Ana Rivera");
    }
    // The parent opens the child's conversation.
    let read = page
        .fetch(
            "GET",
            &format!("/conversations/sessions/{session}"),
            &[("Authorization", &parent_auth)],
            None,
        )
        .await;
    assert_eq!(read.body["messages"], viewer.body["messages"]);

    // The child deletes a conversation (`ChatService.deleteConversation`), then logs out.
    let deleted = page
        .fetch(
            "DELETE",
            &format!("/convo_history?sessionId={other}"),
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let logout = page
        .fetch(
            "POST",
            "/auth/logout",
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            None,
        )
        .await;
    assert_eq!(logout.status, 204, "{logout:?}");
    let after = page
        .fetch(
            "GET",
            "/conversations/sessions?",
            &[("Authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(after.status, 401);
}

/// The demo's environment: the development users and CORS for the frontend's origins.
fn demo_environment(mut env: HashMap<String, String>) -> HashMap<String, String> {
    env.insert("CMZ_DEV_USERS".into(), "embedded".into());
    env.insert(
        "CMZ_CORS_ORIGINS".into(),
        cmz_tower::LEGACY_FRONTEND_ORIGINS.into(),
    );
    env
}

async fn demo(env: HashMap<String, String>) -> String {
    let state = cmz_tower::state_from_env(&|name| env.get(name).cloned())
        .await
        .expect("the demo's state");
    support::serve(cmz_tower::router(state)).await
}

#[tokio::test]
async fn the_frontend_s_requests_succeed_on_the_in_memory_demo() {
    replay(demo(demo_environment(HashMap::new())).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frontend_s_requests_succeed_on_dynamodb() {
    let env = demo_environment(support::dynamo_environment(&[]));
    replay(demo(env).await).await;
}
