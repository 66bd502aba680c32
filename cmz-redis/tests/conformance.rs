//! The shared conformance checks against a real redis-server.

use std::sync::Arc;
use std::time::Duration;

use cmz_core::relay::{MirrorEvent, StreamMirror};
use cmz_redis::Redis;
use cmz_redis::testing::{RedisServer, shared_url};

#[tokio::test]
async fn the_stream_mirror_conforms() {
    let redis = Redis::connect(&shared_url()).await.unwrap();
    cmz_core::testing::check_stream_mirror(&redis.stream_mirror()).await;
}

#[tokio::test]
async fn the_rate_limit_store_conforms() {
    let redis = Redis::connect(&shared_url()).await.unwrap();
    cmz_core::testing::check_rate_limit_store(&redis.rate_limits()).await;
}

#[tokio::test]
async fn a_malformed_url_is_a_validation_error_and_a_dead_server_unavailable() {
    assert_eq!(
        Redis::connect("postgres://nope").await.unwrap_err().code(),
        "validation_error"
    );
    let mut server = RedisServer::start();
    let redis = Redis::connect(&server.url()).await.unwrap();
    let mirror = Arc::new(redis.stream_mirror());
    mirror
        .append("s1", 1, &MirrorEvent::Cancelled, Duration::from_secs(5))
        .await
        .unwrap();
    server.stop();
    let error = mirror
        .append("s1", 2, &MirrorEvent::Cancelled, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "unavailable", "{error}");
}
