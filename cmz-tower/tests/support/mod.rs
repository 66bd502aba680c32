//! What the integration tests share: the environment of a server on DynamoDB Local, and
//! serving a router over loopback. Each test file uses some of them.
#![allow(dead_code)]

use std::collections::HashMap;

/// The environment of one test on DynamoDB: tables of its own on the shared DynamoDB Local
/// (created at start), the development users and a JWT secret; `extra` adds or overrides.
pub(crate) fn dynamo_environment(extra: &[(&str, &str)]) -> HashMap<String, String> {
    let settings = cmz_dynamo::testing::isolated_settings(&cmz_dynamo::testing::shared_endpoint());
    let mut env: HashMap<String, String> = HashMap::new();
    for (variable, table) in settings.tables.all() {
        env.insert(variable.to_owned(), table.to_owned());
    }
    env.insert(
        "DYNAMODB_ENDPOINT_URL".into(),
        settings.endpoint_url.unwrap(),
    );
    env.insert("CMZ_DYNAMODB_CREATE_TABLES".into(), "1".into());
    env.insert("CMZ_DEV_USERS".into(), "embedded".into());
    env.insert(
        "JWT_SECRET".into(),
        "dynamo-http-test-secret-0123456789abcdef".into(),
    );
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    env
}

/// Serves `app` on a free loopback port with cmz's own accept loop (as the demo does);
/// returns its base URL.
pub(crate) async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(cmz_tower::serve_with(
        listener,
        app,
        cmz_tower::ConnectionLimits::default(),
        std::future::pending(),
    ));
    format!("http://{address}")
}

pub(crate) mod memory;
