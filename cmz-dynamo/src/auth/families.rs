//! Families on the legacy family table, with membership items in the meta table.

use super::*;

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

    pub(crate) fn family_from(item: &Item) -> Result<Family> {
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
            retention_days: reader
                .opt_u64("retentionDays")
                .and_then(|d| u32::try_from(d).ok()),
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
        let key = format!("member#{user}");
        let update = self
            .db
            .inner
            .client
            .update_item()
            .table_name(meta)
            .key("pk", s(key.clone()))
            .expression_attribute_values(":f", AttributeValue::Ss(vec![family.to_owned()]));
        if member {
            update
                .update_expression("ADD families :f")
                .send()
                .await
                .map_err(|e| map_sdk("UpdateItem", meta, e))?;
            return Ok(());
        }
        // Never creates the item; and one left with no family is removed, so nothing
        // names a user who belongs nowhere.
        let result = update
            .update_expression("DELETE families :f")
            .condition_expression("attribute_exists(pk)")
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let empty = out
                    .attributes
                    .as_ref()
                    .is_none_or(|a| !a.contains_key("families"));
                if empty {
                    self.db
                        .inner
                        .client
                        .delete_item()
                        .table_name(meta)
                        .key("pk", s(key))
                        .condition_expression("attribute_not_exists(families)")
                        .send()
                        .await
                        .map(drop)
                        .or_else(|e| {
                            if e.as_service_error()
                                .is_some_and(|e| e.is_conditional_check_failed_exception())
                            {
                                Ok(()) // a family was added meanwhile
                            } else {
                                Err(map_sdk("DeleteItem", meta, e))
                            }
                        })?;
                }
                Ok(())
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(map_sdk("UpdateItem", meta, e)),
        }
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
        if let Some(days) = family.retention_days {
            item.insert("retentionDays".into(), n(days));
        }
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
