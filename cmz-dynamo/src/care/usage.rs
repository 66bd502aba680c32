//! Daily usage counters: one item per day, user, animal and model.

use futures::{StreamExt as _, TryStreamExt as _};

use cmz_core::Error;
use cmz_core::ids::{AnimalId, FamilyId, UserId};

use super::*;
use crate::attr::{Reader, n};
use crate::tables::TTL_ATTRIBUTE;

/// How long a counter is kept after its day: a year's report, and a month to spare.
const USAGE_KEPT_DAYS: i64 = 400;

/// The partition of a day's counters.
pub(super) fn day_pk(day: NaiveDate) -> String {
    format!("usage#{}", day.format("%Y-%m-%d"))
}

/// Where a user's counters begin in a day's partition. Ids never contain `/` (see the
/// module docs), so this prefix is no other user's.
pub(super) fn user_prefix(user: &UserId) -> String {
    format!("{user}/")
}

fn usage_sk(key: &UsageKey) -> String {
    format!(
        "{}{}/{}",
        user_prefix(&key.user_id),
        key.animal_id,
        key.model
    )
}

/// A stored counter.
pub(crate) fn usage_from(item: &Item) -> Result<UsageRow> {
    let reader = Reader::new(item, "usage counter");
    let day = reader
        .str("pk")?
        .strip_prefix("usage#")
        .and_then(|day| NaiveDate::parse_from_str(day, "%Y-%m-%d").ok())
        .ok_or_else(|| Error::internal("stored usage counter has a bad `pk`"))?;
    let count = |name: &str| reader.opt_u64(name).unwrap_or(0);
    Ok(UsageRow {
        key: UsageKey {
            day,
            user_id: UserId::new(reader.str("userId")?)?,
            family_id: reader.opt_str("familyId").map(FamilyId::new).transpose()?,
            animal_id: AnimalId::new(reader.str("animalId")?)?,
            model: reader.str("model")?.to_owned(),
        },
        counts: UsageCounts {
            prompt_tokens: count("promptTokens"),
            completion_tokens: count("completionTokens"),
            turns: count("turns"),
            fallbacks: count("fallbacks"),
        },
    })
}

impl DynamoCareStore {
    /// One `UpdateItem`: the counts are `ADD`ed (so concurrent adds all count), the
    /// family is the latest one.
    pub(super) async fn add_usage_counts(
        &self,
        key: &UsageKey,
        counts: &UsageCounts,
    ) -> Result<()> {
        let table = self.table();
        let expires = key
            .day
            .and_hms_opt(0, 0, 0)
            .map_or(0, |midnight| midnight.and_utc().timestamp())
            .saturating_add(USAGE_KEPT_DAYS * 86_400);
        let family = match &key.family_id {
            Some(_) => ", #family = :family",
            None => " REMOVE #family",
        };
        let update = format!(
            "SET #user = :user, #animal = :animal, #model = :model, #ttl = :ttl{family} \
             ADD #prompt :prompt, #completion :completion, #turns :turns, #fallbacks :fallbacks"
        );
        let mut request = self
            .client()
            .update_item()
            .table_name(table)
            .key("pk", s(day_pk(key.day)))
            .key("sk", s(usage_sk(key)))
            .update_expression(update)
            .expression_attribute_names("#user", "userId")
            .expression_attribute_names("#animal", "animalId")
            .expression_attribute_names("#model", "model")
            .expression_attribute_names("#family", "familyId")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_names("#prompt", "promptTokens")
            .expression_attribute_names("#completion", "completionTokens")
            .expression_attribute_names("#turns", "turns")
            .expression_attribute_names("#fallbacks", "fallbacks")
            .expression_attribute_values(":user", s(key.user_id.as_str()))
            .expression_attribute_values(":animal", s(key.animal_id.as_str()))
            .expression_attribute_values(":model", s(key.model.clone()))
            .expression_attribute_values(":ttl", n(expires))
            .expression_attribute_values(":prompt", n(counts.prompt_tokens))
            .expression_attribute_values(":completion", n(counts.completion_tokens))
            .expression_attribute_values(":turns", n(counts.turns))
            .expression_attribute_values(":fallbacks", n(counts.fallbacks))
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        if let Some(family) = &key.family_id {
            request = request.expression_attribute_values(":family", s(family.as_str()));
        }
        let out = request
            .send()
            .await
            .map_err(|e| map_sdk("UpdateItem", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), true);
        Ok(())
    }

    /// One `Query` of the day's partition, from the user's prefix.
    pub(super) async fn user_usage_counts(
        &self,
        user: &UserId,
        day: NaiveDate,
    ) -> Result<UsageCounts> {
        let items = self
            .query_all(
                self.query()
                    .key_condition_expression("pk = :pk AND begins_with(sk, :user)")
                    .expression_attribute_values(":pk", s(day_pk(day)))
                    .expression_attribute_values(":user", s(user_prefix(user))),
            )
            .await?;
        let mut total = UsageCounts::default();
        for item in &items {
            total.add(&usage_from(item)?.counts);
        }
        Ok(total)
    }

    /// One `Query` per day (a few at a time), sorted by key.
    pub(super) async fn usage_rows(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<UsageRow>> {
        let per_day: Vec<Vec<Item>> = futures::stream::iter(days(from, to).map(|day| {
            self.query_all(
                self.query()
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", s(day_pk(day))),
            )
        }))
        .buffer_unordered(DAYS_AT_ONCE)
        .try_collect()
        .await?;
        let mut rows = per_day
            .iter()
            .flatten()
            .map(usage_from)
            .collect::<Result<Vec<_>>>()?;
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str, animal: &str, model: &str) -> UsageKey {
        UsageKey {
            day: NaiveDate::from_ymd_opt(2026, 12, 3).unwrap(),
            user_id: UserId::new(user).unwrap(),
            family_id: None,
            animal_id: AnimalId::new(animal).unwrap(),
            model: model.into(),
        }
    }

    #[test]
    fn ids_with_separators_of_other_layouts_keep_their_counters_apart() {
        // `#` and `-` are valid in ids; `/` is not, which is why it separates.
        assert!(UserId::new("a/b").is_err() && AnimalId::new("a/b").is_err());
        let a = usage_sk(&key("kid#1", "lion", "m"));
        let b = usage_sk(&key("kid", "1#lion", "m"));
        assert_ne!(a, b);
        assert!(!b.starts_with(&user_prefix(&UserId::new("kid#1").unwrap())));
        assert!(!a.starts_with(&user_prefix(&UserId::new("kid").unwrap())));
        assert_eq!(day_pk(key("k", "a", "m").day), "usage#2026-12-03");
    }

    #[test]
    fn a_counter_reads_back_from_its_attributes() {
        let mut stored = key("kid#1", "lion", "org/model#2");
        stored.family_id = Some(FamilyId::new("fam1").unwrap());
        let mut item = Item::new();
        item.insert("pk".into(), s(day_pk(stored.day)));
        item.insert("sk".into(), s(usage_sk(&stored)));
        item.insert("userId".into(), s("kid#1"));
        item.insert("animalId".into(), s("lion"));
        item.insert("model".into(), s("org/model#2"));
        item.insert("familyId".into(), s("fam1"));
        item.insert("turns".into(), n(3));
        item.insert("promptTokens".into(), n(120));
        let row = usage_from(&item).unwrap();
        assert_eq!(row.key, stored);
        assert_eq!(
            row.counts,
            UsageCounts {
                prompt_tokens: 120,
                completion_tokens: 0,
                turns: 3,
                fallbacks: 0
            }
        );
        item.insert("pk".into(), s("usage#yesterday"));
        assert_eq!(usage_from(&item).unwrap_err().code(), "internal_error");
    }
}
