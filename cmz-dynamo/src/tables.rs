//! Creating the tables (for development and tests) and checking them at startup.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    LocalSecondaryIndex, Projection, ProjectionType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};
use cmz_core::{Error, Result};

use crate::config::TableNames;
use crate::error::map_sdk;

/// The GSI listing a user's sessions by `lastActivity`.
pub const USER_INDEX: &str = "userId-lastActivity-index";
/// The GSI listing an animal's sessions by `lastActivity`.
pub const ANIMAL_INDEX: &str = "animalId-lastActivity-index";
/// The GSI finding a user by email.
pub const EMAIL_INDEX: &str = "email-index";
/// The local secondary index finding a turn by its idempotency key.
pub const TURN_KEY_INDEX: &str = "turnKey-index";
/// The attribute DynamoDB's TTL deletes by (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "ttl";

struct Spec {
    hash: (&'static str, ScalarAttributeType),
    range: Option<(&'static str, ScalarAttributeType)>,
    indexes: &'static [(&'static str, &'static str, Option<&'static str>)],
    local_indexes: &'static [(&'static str, &'static str)],
    ttl: bool,
}

fn specs(names: &TableNames) -> Vec<(&str, &'static str, Spec)> {
    use ScalarAttributeType::{N, S};
    let [conv, sess, msgs, users, fams, animals, meta] = names.all();
    vec![
        (
            conv.1,
            conv.0,
            Spec {
                hash: ("conversationId", S),
                range: None,
                indexes: &[],
                local_indexes: &[],
                ttl: false,
            },
        ),
        (
            sess.1,
            sess.0,
            Spec {
                hash: ("sessionId", S),
                range: None,
                indexes: &[
                    (USER_INDEX, "userId", Some("lastActivity")),
                    (ANIMAL_INDEX, "animalId", Some("lastActivity")),
                ],
                local_indexes: &[],
                ttl: true,
            },
        ),
        (
            msgs.1,
            msgs.0,
            Spec {
                hash: ("conversationId", S),
                range: Some(("seq", N)),
                indexes: &[],
                local_indexes: &[(TURN_KEY_INDEX, "turnKey")],
                ttl: true,
            },
        ),
        (
            users.1,
            users.0,
            Spec {
                hash: ("userId", S),
                range: None,
                indexes: &[(EMAIL_INDEX, "email", None)],
                local_indexes: &[],
                ttl: false,
            },
        ),
        (
            fams.1,
            fams.0,
            Spec {
                hash: ("familyId", S),
                range: None,
                indexes: &[],
                local_indexes: &[],
                ttl: false,
            },
        ),
        (
            animals.1,
            animals.0,
            Spec {
                hash: ("animalId", S),
                range: None,
                indexes: &[],
                local_indexes: &[],
                ttl: false,
            },
        ),
        (
            meta.1,
            meta.0,
            Spec {
                hash: ("pk", S),
                range: None,
                indexes: &[],
                local_indexes: &[],
                ttl: true,
            },
        ),
    ]
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| Error::internal(format!("key schema: {e}")))
}

fn attr(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(|e| Error::internal(format!("attribute definition: {e}")))
}

/// Creates every table of `names` that does not exist yet, with its GSIs and TTL setting
/// (on-demand billing), and waits until all are `ACTIVE`. Existing tables are left alone.
/// Meant for development and tests; production tables come from infrastructure code.
#[tracing::instrument(name = "dynamodb.ensure_tables", skip_all)]
pub async fn ensure_tables(client: &Client, names: &TableNames) -> Result<()> {
    let existing = list_tables(client).await?;
    for (table, _, spec) in specs(names) {
        if existing.iter().any(|t| t == table) {
            continue;
        }
        let mut defs = vec![attr(spec.hash.0, spec.hash.1.clone())?];
        let mut keys = vec![key(spec.hash.0, KeyType::Hash)?];
        if let Some((name, kind)) = &spec.range {
            defs.push(attr(name, kind.clone())?);
            keys.push(key(name, KeyType::Range)?);
        }
        let mut request = client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(Some(keys));
        for (index, hash, range) in spec.indexes {
            for name in std::iter::once(*hash).chain(*range) {
                if !defs.iter().any(|d| d.attribute_name() == name) {
                    defs.push(attr(name, ScalarAttributeType::S)?);
                }
            }
            let mut index_keys = vec![key(hash, KeyType::Hash)?];
            if let Some(range) = range {
                index_keys.push(key(range, KeyType::Range)?);
            }
            request = request.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(*index)
                    .set_key_schema(Some(index_keys))
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::All)
                            .build(),
                    )
                    .build()
                    .map_err(|e| Error::internal(format!("index definition: {e}")))?,
            );
        }
        for (index, range) in spec.local_indexes {
            if !defs.iter().any(|d| d.attribute_name() == *range) {
                defs.push(attr(range, ScalarAttributeType::S)?);
            }
            request = request.local_secondary_indexes(
                LocalSecondaryIndex::builder()
                    .index_name(*index)
                    .key_schema(key(spec.hash.0, KeyType::Hash)?)
                    .key_schema(key(range, KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::All)
                            .build(),
                    )
                    .build()
                    .map_err(|e| Error::internal(format!("index definition: {e}")))?,
            );
        }
        match request.set_attribute_definitions(Some(defs)).send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) => {}
            Err(e) => return Err(map_sdk("CreateTable", table, e)),
        }
        wait_active(client, table).await?;
        if spec.ttl {
            client
                .update_time_to_live()
                .table_name(table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .attribute_name(TTL_ATTRIBUTE)
                        .enabled(true)
                        .build()
                        .map_err(|e| Error::internal(format!("ttl: {e}")))?,
                )
                .send()
                .await
                .map_err(|e| map_sdk("UpdateTimeToLive", table, e))?;
        }
        tracing::info!(table, "created DynamoDB table");
    }
    Ok(())
}

async fn wait_active(client: &Client, table: &str) -> Result<()> {
    for _ in 0..240 {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| map_sdk("DescribeTable", table, e))?;
        if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::unavailable(
        format!("table {table} did not become ACTIVE within a minute"),
        std::io::Error::other("table not active"),
    ))
}

async fn list_tables(client: &Client) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut start: Option<String> = None;
    loop {
        let page = client
            .list_tables()
            .set_exclusive_start_table_name(start.take())
            .send()
            .await
            .map_err(|e| map_sdk("ListTables", "*", e))?;
        names.extend(page.table_names().iter().cloned());
        match page.last_evaluated_table_name() {
            Some(last) => start = Some(last.to_owned()),
            None => return Ok(names),
        }
    }
}

/// Checks at startup that every configured table exists with the keys and GSIs cmz uses.
///
/// A missing table is a `validation_error` naming it, the variable that configures it and
/// the existing tables with similar names (`quest-dev-conversations` vs
/// `quest-dev-conversation`). An unreachable endpoint is `unavailable`.
#[tracing::instrument(name = "dynamodb.check_tables", skip_all)]
pub async fn check_tables(client: &Client, names: &TableNames) -> Result<()> {
    let existing = list_tables(client).await?;
    for (table, variable, spec) in specs(names) {
        if !existing.iter().any(|t| t == table) {
            let similar = similar_names(table, &existing);
            let hint = if similar.is_empty() {
                format!(
                    "no existing table has a similar name ({} tables exist)",
                    existing.len()
                )
            } else {
                format!("tables with similar names: {}", similar.join(", "))
            };
            return Err(Error::validation(
                variable,
                format!("DynamoDB table {table:?} ({variable}) does not exist; {hint}"),
            ));
        }
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| map_sdk("DescribeTable", table, e))?;
        let Some(description) = described.table() else {
            continue;
        };
        let hash_key = description
            .key_schema()
            .iter()
            .find(|k| k.key_type() == &KeyType::Hash)
            .map(|k| k.attribute_name().to_owned());
        if hash_key.as_deref() != Some(spec.hash.0) {
            return Err(Error::validation(
                variable,
                format!(
                    "DynamoDB table {table:?} ({variable}) has hash key {:?}; cmz expects {:?}",
                    hash_key.unwrap_or_default(),
                    spec.hash.0
                ),
            ));
        }
        for (index, ..) in spec.indexes {
            if !description
                .global_secondary_indexes()
                .iter()
                .any(|g| g.index_name() == Some(index))
            {
                return Err(Error::validation(
                    variable,
                    format!(
                        "DynamoDB table {table:?} ({variable}) has no GSI {index:?}; create it (see cmz_dynamo::ensure_tables)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Existing names close to `wanted`: an edit distance of at most a quarter of its length
/// (at least 2), or one containing the other.
pub(crate) fn similar_names(wanted: &str, existing: &[String]) -> Vec<String> {
    let limit = (wanted.len() / 4).max(2);
    let mut found: Vec<(usize, String)> = existing
        .iter()
        .filter_map(|name| {
            let distance = edit_distance(&wanted.to_lowercase(), &name.to_lowercase());
            let contains = name.contains(wanted) || wanted.contains(name.as_str());
            (distance <= limit || contains).then(|| (distance, name.clone()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, n)| n).take(5).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_names_find_the_legacy_typo() {
        let existing = vec![
            "quest-dev-conversations".to_owned(),
            "quest-dev-sessions".to_owned(),
            "billing".to_owned(),
        ];
        assert_eq!(
            similar_names("quest-dev-conversation", &existing),
            vec!["quest-dev-conversations"]
        );
        assert_eq!(
            similar_names("quest-dev-session", &existing),
            vec!["quest-dev-sessions"]
        );
        assert!(similar_names("orders", &existing).is_empty());
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
