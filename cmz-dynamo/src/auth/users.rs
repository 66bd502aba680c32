//! Users on the legacy user table.

use super::*;

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

    pub(crate) fn user_from(item: &Item) -> Result<User> {
        let mut json = item_json(item);
        if let Some(email) = json
            .get("email")
            .and_then(|e| e.as_str())
            .map(str::to_lowercase)
        {
            json["email"] = serde_json::Value::String(email);
        }
        serde_json::from_value(json)
            .map_err(|e| Error::internal("a stored user item cmz cannot read").with_source(e))
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
            serde_json::to_value(&user).map_err(|e| Error::internal("user").with_source(e))?;
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
            .map_err(|e| Error::internal("put").with_source(e))?;
        let mut claim = Item::new();
        claim.insert("pk".into(), s(format!("email#{}", user.email)));
        claim.insert("userId".into(), s(user.user_id.as_str()));
        let claim_put = Put::builder()
            .table_name(meta)
            .set_item(Some(claim))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| Error::internal("put").with_source(e))?;
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

    #[tracing::instrument(name = "dynamodb.delete_user", skip_all, fields(user = %user.user_id))]
    async fn delete_user(&self, user: &User) -> Result<bool> {
        let (users, meta) = (&self.db.inner.tables.users, &self.db.inner.tables.meta);
        let removed = self
            .db
            .delete_item(users, "userId", user.user_id.as_str())
            .await?;
        // What cmz keeps to find the user: the email claim and the membership index.
        let email = user.email.trim().to_lowercase();
        self.db
            .delete_item(meta, "pk", &format!("email#{email}"))
            .await?;
        self.db
            .delete_item(meta, "pk", &format!("member#{}", user.user_id))
            .await?;
        Ok(removed.is_some())
    }
}
