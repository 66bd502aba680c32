//! The auth stores on DynamoDB: users and families on the legacy tables; refresh tokens,
//! revocations, rate-limit counters, email claims and family membership in cmz's meta
//! table (hash key `pk`, TTL attribute `ttl`).

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
    RevocationStore, User, UserStore,
};
use cmz_core::ids::{FamilyId, UserId};
use cmz_core::{Error, Result};

use crate::attr::{Item, Reader, from_json, n, s, to_json};
use crate::backend::Dynamo;
use crate::error::map_sdk;
use crate::tables::{EMAIL_INDEX, TTL_ATTRIBUTE};

fn json_item(value: &serde_json::Value) -> Item {
    match from_json(value) {
        AttributeValue::M(map) => map
            .into_iter()
            .filter(|(_, v)| !matches!(v, AttributeValue::Null(_)))
            .collect(),
        _ => Item::new(),
    }
}

fn item_json(item: &Item) -> serde_json::Value {
    to_json(&AttributeValue::M(item.clone()))
}

fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    e: &aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

/// Users on the legacy user table (hash key `userId`, GSI `email-index` on `email`), in
/// the legacy shape (`email`, `displayName`, `role`, `userType`, `familyId`,
/// `passwordHash`, `softDelete`, `created {at, by}`).
///
/// Emails are unique: creating a user also claims `email#<email>` in the meta table in the
/// same transaction.
#[derive(Debug, Clone)]
pub struct DynamoUserStore {
    db: Dynamo,
}

impl DynamoUserStore {
    /// The store on `db`'s user table.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }

    fn user_from(item: &Item) -> Result<User> {
        let mut json = item_json(item);
        if let Some(email) = json
            .get("email")
            .and_then(|e| e.as_str())
            .map(str::to_lowercase)
        {
            json["email"] = serde_json::Value::String(email);
        }
        serde_json::from_value(json).map_err(|e| Error::Internal {
            message: "a stored user item cmz cannot read".into(),
            source: Some(Box::new(e)),
        })
    }
}

#[async_trait]
impl UserStore for DynamoUserStore {
    #[tracing::instrument(name = "dynamodb.get_user", skip_all, fields(user = %id))]
    async fn get_user(&self, id: &UserId) -> Result<Option<User>> {
        let item = self
            .db
            .get_item(&self.db.inner.tables.users, "userId", id.as_str())
            .await?;
        item.as_ref().map(Self::user_from).transpose()
    }

    #[tracing::instrument(name = "dynamodb.find_by_email", skip_all)]
    async fn find_by_email(&self, email: &str) -> Result<Option<User>> {
        let table = &self.db.inner.tables.users;
        let email = email.trim().to_lowercase();
        let out = self
            .db
            .inner
            .client
            .query()
            .table_name(table)
            .index_name(EMAIL_INDEX)
            .key_condition_expression("email = :e")
            .expression_attribute_values(":e", s(email.clone()))
            .limit(2)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("Query", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), false);
        match out.items().first() {
            // The index is eventually consistent: read the user itself.
            Some(item) => {
                let id = UserId::new(Reader::new(item, "user").str("userId")?)?;
                Ok(self.get_user(&id).await?.filter(|u| u.email == email))
            }
            None => Ok(None),
        }
    }

    #[tracing::instrument(name = "dynamodb.create_user", skip_all, fields(user = %user.user_id))]
    async fn create_user(&self, user: &User) -> Result<()> {
        let (users, meta) = (&self.db.inner.tables.users, &self.db.inner.tables.meta);
        let mut user = user.clone();
        user.email = user.email.trim().to_lowercase();
        let json =
            serde_json::to_value(&user).map_err(|e| Error::internal(format!("user: {e}")))?;
        let mut item = json_item(&json);
        item.insert(
            "created".into(),
            from_json(
                &serde_json::json!({"at": crate::attr::time_string(Utc::now()), "by": "cmz"}),
            ),
        );
        let user_put = Put::builder()
            .table_name(users)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(userId)")
            .build()
            .map_err(|e| Error::internal(format!("put: {e}")))?;
        let mut claim = Item::new();
        claim.insert("pk".into(), s(format!("email#{}", user.email)));
        claim.insert("userId".into(), s(user.user_id.as_str()));
        let claim_put = Put::builder()
            .table_name(meta)
            .set_item(Some(claim))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| Error::internal(format!("put: {e}")))?;
        let result = self
            .db
            .inner
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(user_put).build())
            .transact_items(TransactWriteItem::builder().put(claim_put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_transaction_canceled_exception()) =>
            {
                Err(Error::conflict(format!(
                    "user {} or email {} already exists",
                    user.user_id, user.email
                )))
            }
            Err(e) => Err(map_sdk("TransactWriteItems", users, e)),
        }?;
        // A user written by the legacy code has no claim: check the index as well.
        let duplicates = self
            .db
            .inner
            .client
            .query()
            .table_name(users)
            .index_name(EMAIL_INDEX)
            .key_condition_expression("email = :e")
            .expression_attribute_values(":e", s(user.email.clone()))
            .limit(2)
            .send()
            .await
            .map_err(|e| map_sdk("Query", users, e))?;
        if duplicates.items().len() > 1 {
            tracing::warn!(email = %user.email, "the email was already used by a user without a claim item");
        }
        Ok(())
    }

    #[tracing::instrument(name = "dynamodb.set_password_hash", skip_all, fields(user = %id))]
    async fn set_password_hash(&self, id: &UserId, hash: &str) -> Result<()> {
        let table = &self.db.inner.tables.users;
        let result = self
            .db
            .inner
            .client
            .update_item()
            .table_name(table)
            .key("userId", s(id.as_str()))
            .update_expression("SET passwordHash = :h")
            .condition_expression("attribute_exists(userId)")
            .expression_attribute_values(":h", s(hash))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(Error::not_found(format!("user {id}"))),
            Err(e) => Err(map_sdk("UpdateItem", table, e)),
        }
    }
}

/// Families on the legacy family table (hash key `familyId`: `familyName`, `parents`,
/// `students`, `softDelete`).
///
/// `families_of` is a `GetItem` of the user's membership item in the meta table (kept by
/// `put_family`) and of the user's own `familyId`, then a `BatchGetItem` of those
/// families; only families that really list the user count, so a stale entry grants
/// nothing. `list_families` (an administrator's listing) scans.
#[derive(Debug, Clone)]
pub struct DynamoFamilyDirectory {
    db: Dynamo,
}

impl DynamoFamilyDirectory {
    /// The directory on `db`'s family table.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }

    fn family_from(item: &Item) -> Result<Family> {
        let reader = Reader::new(item, "family");
        let ids = |key: &str| -> Vec<UserId> {
            reader
                .str_list(key)
                .into_iter()
                .filter_map(|v| UserId::new(v).ok())
                .collect()
        };
        Ok(Family {
            family_id: FamilyId::new(reader.str("familyId")?)?,
            family_name: reader.opt_str("familyName").unwrap_or_default().to_owned(),
            parents: ids("parents"),
            students: ids("students"),
            soft_delete: reader.bool("softDelete"),
        })
    }

    async fn get_many(&self, ids: BTreeSet<String>) -> Result<Vec<Family>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let table = &self.db.inner.tables.families;
        let keys = ids
            .into_iter()
            .map(|id| [("familyId".to_owned(), s(id))].into_iter().collect())
            .collect();
        let mut families = crate::batch::get_all(&self.db, table, keys)
            .await?
            .iter()
            .map(Self::family_from)
            .collect::<Result<Vec<_>>>()?;
        families.sort_by(|a, b| a.family_id.cmp(&b.family_id));
        Ok(families)
    }

    async fn member_item(&self, user: &str) -> Result<BTreeSet<String>> {
        let meta = &self.db.inner.tables.meta;
        let out = self
            .db
            .inner
            .client
            .get_item()
            .table_name(meta)
            .key("pk", s(format!("member#{user}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", meta, e))?;
        Ok(out
            .item
            .map(|i| {
                Reader::new(&i, "membership")
                    .str_list("families")
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn set_membership(&self, user: &str, family: &str, member: bool) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        let expression = if member {
            "ADD families :f"
        } else {
            "DELETE families :f"
        };
        self.db
            .inner
            .client
            .update_item()
            .table_name(meta)
            .key("pk", s(format!("member#{user}")))
            .update_expression(expression)
            .expression_attribute_values(":f", AttributeValue::Ss(vec![family.to_owned()]))
            .send()
            .await
            .map_err(|e| map_sdk("UpdateItem", meta, e))?;
        Ok(())
    }
}

#[async_trait]
impl FamilyDirectory for DynamoFamilyDirectory {
    #[tracing::instrument(name = "dynamodb.get_family", skip_all, fields(family = %id))]
    async fn get_family(&self, id: &FamilyId) -> Result<Option<Family>> {
        Ok(self.get_many([id.as_str().to_owned()].into()).await?.pop())
    }

    #[tracing::instrument(name = "dynamodb.families_of", skip_all, fields(user = %user))]
    async fn families_of(&self, user: &UserId) -> Result<Vec<Family>> {
        let mut ids = self.member_item(user.as_str()).await?;
        let users = &self.db.inner.tables.users;
        let out = self
            .db
            .inner
            .client
            .get_item()
            .table_name(users)
            .key("userId", s(user.as_str()))
            .projection_expression("familyId")
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", users, e))?;
        if let Some(family) = out
            .item
            .as_ref()
            .and_then(|i| Reader::new(i, "user").opt_str("familyId"))
        {
            ids.insert(family.to_owned());
        }
        let families = self.get_many(ids).await?;
        Ok(families
            .into_iter()
            .filter(|f| f.parents.contains(user) || f.students.contains(user))
            .collect())
    }

    #[tracing::instrument(name = "dynamodb.put_family", skip_all, fields(family = %family.family_id))]
    async fn put_family(&self, family: &Family) -> Result<()> {
        let table = &self.db.inner.tables.families;
        let mut item = Item::new();
        item.insert("familyId".into(), s(family.family_id.as_str()));
        item.insert("familyName".into(), s(family.family_name.clone()));
        let list = |ids: &[UserId]| AttributeValue::L(ids.iter().map(|u| s(u.as_str())).collect());
        item.insert("parents".into(), list(&family.parents));
        item.insert("students".into(), list(&family.students));
        item.insert(
            "softDelete".into(),
            AttributeValue::Bool(family.soft_delete),
        );
        let old = self
            .db
            .inner
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| map_sdk("PutItem", table, e))?;
        let before: BTreeSet<String> = old
            .attributes
            .filter(|a| !a.is_empty())
            .and_then(|a| Self::family_from(&a).ok())
            .map(|f| {
                f.parents
                    .iter()
                    .chain(&f.students)
                    .map(|u| u.as_str().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let after: BTreeSet<String> = family
            .parents
            .iter()
            .chain(&family.students)
            .map(|u| u.as_str().to_owned())
            .collect();
        for user in after.iter() {
            self.set_membership(user, family.family_id.as_str(), true)
                .await?;
        }
        for user in before.difference(&after) {
            self.set_membership(user, family.family_id.as_str(), false)
                .await?;
        }
        Ok(())
    }

    #[tracing::instrument(name = "dynamodb.list_families", skip_all)]
    async fn list_families(&self) -> Result<Vec<Family>> {
        let table = &self.db.inner.tables.families;
        let mut families = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .db
                .inner
                .client
                .scan()
                .table_name(table)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Scan", table, e))?;
            for item in page.items() {
                families.push(Self::family_from(item)?);
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        families.sort_by(|a, b| a.family_id.cmp(&b.family_id));
        Ok(families)
    }
}

/// Refresh tokens (`refresh#<hash>`) and revocations (`revoked-jti#<id>`,
/// `revoked-sid#<family>`) in the meta table, each with a TTL. `is_revoked` is one
/// `BatchGetItem`.
#[derive(Debug, Clone)]
pub struct DynamoRevocationStore {
    db: Dynamo,
}

impl DynamoRevocationStore {
    /// The store on `db`'s meta table.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }

    fn record_from(item: &Item, hash: &str) -> Result<RefreshRecord> {
        let reader = Reader::new(item, "refresh token");
        let at = |key: &str| -> Result<DateTime<Utc>> {
            reader
                .opt_time(key)
                .ok_or_else(|| Error::internal(format!("stored refresh token has a bad `{key}`")))
        };
        Ok(RefreshRecord {
            token_hash: hash.to_owned(),
            family_id: reader.str("familyId")?.to_owned(),
            user_id: UserId::new(reader.str("userId")?)?,
            issued_at: at("issuedAt")?,
            expires_at: at("expiresAt")?,
        })
    }

    async fn revoke(&self, pk: String, until: DateTime<Utc>) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        let result = self
            .db
            .inner
            .client
            .update_item()
            .table_name(meta)
            .key("pk", s(pk))
            .update_expression("SET #until = :u, #ttl = :ttl")
            .condition_expression("attribute_not_exists(#until) OR #until < :u")
            .expression_attribute_names("#until", "until")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_values(":u", n(until.timestamp_millis()))
            .expression_attribute_values(":ttl", n(until.timestamp() + 3600))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Already revoked until later.
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(map_sdk("UpdateItem", meta, e)),
        }
    }
}

#[async_trait]
impl RevocationStore for DynamoRevocationStore {
    #[tracing::instrument(name = "dynamodb.insert_refresh", skip_all)]
    async fn insert_refresh(&self, record: &RefreshRecord) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        let mut item = Item::new();
        item.insert("pk".into(), s(format!("refresh#{}", record.token_hash)));
        item.insert("familyId".into(), s(record.family_id.clone()));
        item.insert("userId".into(), s(record.user_id.as_str()));
        item.insert("issuedAt".into(), crate::attr::time(record.issued_at));
        item.insert("expiresAt".into(), crate::attr::time(record.expires_at));
        item.insert("used".into(), AttributeValue::Bool(false));
        item.insert(
            TTL_ATTRIBUTE.into(),
            n(record.expires_at.timestamp() + 86_400),
        );
        let result = self
            .db
            .inner
            .client
            .put_item()
            .table_name(meta)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => {
                Err(Error::conflict("refresh token already stored"))
            }
            Err(e) => Err(map_sdk("PutItem", meta, e)),
        }
    }

    #[tracing::instrument(name = "dynamodb.consume_refresh", skip_all)]
    async fn consume_refresh(&self, token_hash: &str) -> Result<RefreshState> {
        let meta = &self.db.inner.tables.meta;
        let result = self
            .db
            .inner
            .client
            .update_item()
            .table_name(meta)
            .key("pk", s(format!("refresh#{token_hash}")))
            .update_expression("SET used = :t")
            .condition_expression("attribute_exists(pk) AND used = :f")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":f", AttributeValue::Bool(false))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(out) => Ok(RefreshState::Fresh(Self::record_from(
                &out.attributes.unwrap_or_default(),
                token_hash,
            )?)),
            Err(e) if is_condition_failure(&e) => {
                let old = match e.into_service_error() {
                    UpdateItemError::ConditionalCheckFailedException(c) => {
                        c.item.filter(|i| !i.is_empty())
                    }
                    _ => None,
                };
                match old {
                    Some(item) => Ok(RefreshState::Reused(Self::record_from(&item, token_hash)?)),
                    None => Ok(RefreshState::Unknown),
                }
            }
            Err(e) => Err(map_sdk("UpdateItem", meta, e)),
        }
    }

    #[tracing::instrument(name = "dynamodb.revoke_family", skip_all)]
    async fn revoke_family(&self, family_id: &str, until: DateTime<Utc>) -> Result<()> {
        self.revoke(format!("revoked-sid#{family_id}"), until).await
    }

    #[tracing::instrument(name = "dynamodb.revoke_token_id", skip_all)]
    async fn revoke_token_id(&self, token_id: &str, until: DateTime<Utc>) -> Result<()> {
        self.revoke(format!("revoked-jti#{token_id}"), until).await
    }

    #[tracing::instrument(name = "dynamodb.is_revoked", skip_all)]
    async fn is_revoked(&self, token_id: Option<&str>, family_id: Option<&str>) -> Result<bool> {
        let mut pks: Vec<String> = Vec::new();
        if let Some(id) = token_id {
            pks.push(format!("revoked-jti#{id}"));
        }
        if let Some(id) = family_id {
            pks.push(format!("revoked-sid#{id}"));
        }
        if pks.is_empty() {
            return Ok(false);
        }
        let meta = &self.db.inner.tables.meta;
        let keys = pks
            .into_iter()
            .map(|pk| [("pk".to_owned(), s(pk))].into_iter().collect())
            .collect();
        let now = Utc::now().timestamp_millis();
        let items = crate::batch::get_all(&self.db, meta, keys).await?;
        Ok(items.iter().any(|i| {
            Reader::new(i, "revocation")
                .opt_i64("until")
                .is_some_and(|u| u > now)
        }))
    }
}

/// Fixed-window counters in the meta table (`rate#<key>`: `count`, `resetsAt`, `ttl`), so
/// login throttling and turn limits hold across server instances. A hit is one
/// conditional `UpdateItem` (`ADD count 1` while the window is open), or a conditional
/// `PutItem` that opens a new window.
#[derive(Debug, Clone)]
pub struct DynamoRateLimitStore {
    db: Dynamo,
}

impl DynamoRateLimitStore {
    /// The store on `db`'s meta table.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }
}

fn count_from(item: &Item) -> Option<RateCount> {
    let reader = Reader::new(item, "rate counter");
    Some(RateCount {
        count: u32::try_from(reader.opt_u64("count")?).unwrap_or(u32::MAX),
        resets_at: Utc
            .timestamp_millis_opt(reader.opt_i64("resetsAt")?)
            .single()?,
    })
}

#[async_trait]
impl RateLimitStore for DynamoRateLimitStore {
    #[tracing::instrument(name = "dynamodb.rate_hit", skip_all)]
    async fn hit(&self, key: &str, window: Duration) -> Result<RateCount> {
        let meta = &self.db.inner.tables.meta;
        let pk = format!("rate#{key}");
        for _ in 0..8 {
            let now = Utc::now();
            let counted = self
                .db
                .inner
                .client
                .update_item()
                .table_name(meta)
                .key("pk", s(pk.clone()))
                .update_expression("ADD #count :one")
                .condition_expression("resetsAt > :now")
                .expression_attribute_names("#count", "count")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .return_values(ReturnValue::AllNew)
                .send()
                .await;
            match counted {
                Ok(out) => {
                    return count_from(&out.attributes.unwrap_or_default())
                        .ok_or_else(|| Error::internal("stored rate counter is malformed"));
                }
                Err(e) if is_condition_failure(&e) => {}
                Err(e) => return Err(map_sdk("UpdateItem", meta, e)),
            }
            let window_ms = i64::try_from(window.as_millis())
                .unwrap_or(i64::MAX / 4)
                .min(i64::MAX / 4);
            let resets = now.timestamp_millis().saturating_add(window_ms);
            let mut item = Item::new();
            item.insert("pk".into(), s(pk.clone()));
            item.insert("count".into(), n(1));
            item.insert("resetsAt".into(), n(resets));
            item.insert(TTL_ATTRIBUTE.into(), n(resets / 1000 + 60));
            let opened = self
                .db
                .inner
                .client
                .put_item()
                .table_name(meta)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk) OR resetsAt <= :now")
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .send()
                .await;
            match opened {
                Ok(_) => {
                    return Ok(RateCount {
                        count: 1,
                        resets_at: Utc.timestamp_millis_opt(resets).single().unwrap_or(now),
                    });
                }
                // Another instance opened the window first: count in it.
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(map_sdk("PutItem", meta, e)),
            }
        }
        Err(Error::conflict(format!(
            "rate counter {key} is too contended"
        )))
    }

    #[tracing::instrument(name = "dynamodb.rate_peek", skip_all)]
    async fn peek(&self, key: &str, _window: Duration) -> Result<RateCount> {
        let meta = &self.db.inner.tables.meta;
        let now = Utc::now();
        let out = self
            .db
            .inner
            .client
            .get_item()
            .table_name(meta)
            .key("pk", s(format!("rate#{key}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", meta, e))?;
        Ok(out
            .item
            .as_ref()
            .and_then(count_from)
            .filter(|c| c.resets_at > now)
            .unwrap_or(RateCount {
                count: 0,
                resets_at: now,
            }))
    }

    #[tracing::instrument(name = "dynamodb.rate_reset", skip_all)]
    async fn reset(&self, key: &str) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        self.db
            .inner
            .client
            .delete_item()
            .table_name(meta)
            .key("pk", s(format!("rate#{key}")))
            .send()
            .await
            .map_err(|e| map_sdk("DeleteItem", meta, e))?;
        Ok(())
    }

    #[tracing::instrument(name = "dynamodb.rate_release", skip_all)]
    async fn release(&self, key: &str) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        let released = self
            .db
            .inner
            .client
            .update_item()
            .table_name(meta)
            .key("pk", s(format!("rate#{key}")))
            .update_expression("ADD #count :minus")
            .condition_expression("#count > :zero AND resetsAt > :now")
            .expression_attribute_names("#count", "count")
            .expression_attribute_values(":minus", n(-1))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(Utc::now().timestamp_millis()))
            .send()
            .await;
        match released {
            Ok(_) => Ok(()),
            // Nothing to give back: the window ended or the count is 0.
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(map_sdk("UpdateItem", meta, e)),
        }
    }
}
