//! The auth stores on DynamoDB: users and families on the legacy tables; refresh tokens,
//! revocations, rate-limit counters, email claims and family membership in cmz's meta
//! table (hash key `pk`, TTL attribute `ttl`).

mod families;
mod limits;
mod revocations;
mod users;

pub use families::DynamoFamilyDirectory;
pub use limits::DynamoRateLimitStore;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use limits::count_from;
pub use revocations::DynamoRevocationStore;
pub use users::DynamoUserStore;

use std::collections::BTreeSet;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnConsumedCapacity, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem,
};
use chrono::{DateTime, TimeZone as _, Utc};
use cmz_core::auth::{
    Family, FamilyDirectory, RateCount, RateLimitStore, RefreshRecord, RefreshState,
    RevocationStore, Tally, User, UserStore,
};
use cmz_core::ids::{FamilyId, UserId};
use cmz_core::{Error, Result};

use crate::attr::{Item, Reader, from_json, n, s, to_json};
use crate::backend::Dynamo;
use crate::error::map_sdk;
use crate::tables::{EMAIL_INDEX, TTL_ATTRIBUTE};

pub(super) fn json_item(value: &serde_json::Value) -> Item {
    match from_json(value) {
        AttributeValue::M(map) => map
            .into_iter()
            .filter(|(_, v)| !matches!(v, AttributeValue::Null(_)))
            .collect(),
        _ => Item::new(),
    }
}

pub(super) fn item_json(item: &Item) -> serde_json::Value {
    to_json(&AttributeValue::M(item.clone()))
}

pub(super) fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    e: &aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}
