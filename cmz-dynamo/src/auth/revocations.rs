//! Refresh tokens and revocations in the meta table.

use super::*;

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

    pub(crate) fn record_from(item: &Item, hash: &str) -> Result<RefreshRecord> {
        let reader = Reader::new(item, "refresh token");
        let at = |key: &str| -> Result<DateTime<Utc>> {
            reader
                .opt_time(key)
                .ok_or_else(|| Error::internal(format!("stored refresh token has a bad `{key}`")))
        };
        Ok(RefreshRecord {
            token_hash: hash.to_owned(),
            chain_id: reader.str("familyId")?.to_owned(),
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
        item.insert("familyId".into(), s(record.chain_id.clone()));
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

    /// The one read of the whole meta table outside an administrator's listing: refresh
    /// records are found by token, not by user, and an index by user would cost a write on
    /// every login and refresh for the rare erasure. The table holds only short-lived
    /// records (tokens, counters, claims), read in pages.
    #[tracing::instrument(name = "dynamodb.forget_user", skip_all, fields(user = %user))]
    async fn forget_user(&self, user: &UserId) -> Result<u64> {
        let meta = &self.db.inner.tables.meta;
        let mut start = None;
        let mut keys = Vec::new();
        loop {
            let out = self
                .db
                .inner
                .client
                .scan()
                .table_name(meta)
                .filter_expression("begins_with(pk, :p) AND userId = :u")
                .expression_attribute_values(":p", s("refresh#"))
                .expression_attribute_values(":u", s(user.as_str()))
                .projection_expression("pk")
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| map_sdk("Scan", meta, e))?;
            self.db.inner.meter.record(out.consumed_capacity(), false);
            keys.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        let count = keys.len() as u64;
        crate::batch::delete_keys(&self.db, meta, keys).await?;
        Ok(count)
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

    #[tracing::instrument(name = "dynamodb.revoke_chain", skip_all)]
    async fn revoke_chain(&self, chain_id: &str, until: DateTime<Utc>) -> Result<()> {
        self.revoke(format!("revoked-sid#{chain_id}"), until).await
    }

    #[tracing::instrument(name = "dynamodb.revoke_token_id", skip_all)]
    async fn revoke_token_id(&self, token_id: &str, until: DateTime<Utc>) -> Result<()> {
        self.revoke(format!("revoked-jti#{token_id}"), until).await
    }

    #[tracing::instrument(name = "dynamodb.is_revoked", skip_all)]
    async fn is_revoked(&self, token_id: Option<&str>, chain_id: Option<&str>) -> Result<bool> {
        let mut pks: Vec<String> = Vec::new();
        if let Some(id) = token_id {
            pks.push(format!("revoked-jti#{id}"));
        }
        if let Some(id) = chain_id {
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
