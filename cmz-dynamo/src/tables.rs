//! The tables cmz needs: creating them, bringing existing ones (a legacy deployment's)
//! up to date in place, and checking them at startup.

mod report;
mod upgrade;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    LocalSecondaryIndex, Projection, ProjectionType, ScalarAttributeType, TableDescription,
};
use cmz_core::{Error, Result};

use crate::config::TableNames;
use crate::error::map_sdk;

pub use report::{
    ENSURE_TABLES_COMMAND, IndexBilling, TableChange, TableEvent, TableProblem, TablesReport,
};

/// The GSI listing a user's sessions by `lastActivity`.
pub const USER_INDEX: &str = "userId-lastActivity-index";
/// The GSI listing an animal's sessions by `startTime`. It projects only the keys, and
/// neither key changes after a session begins, so a turn never writes to it.
pub const ANIMAL_INDEX: &str = "animalId-startTime-index";
/// Indexes earlier versions of cmz made and this one no longer reads, by table spec:
/// `animalId-lastActivity-index` listed an animal's sessions by activity, which cost two
/// write units on every turn to keep in order. [`EnsureOptions::remove_retired_indexes`]
/// deletes them.
pub const RETIRED_INDEXES: &[&str] = &["animalId-lastActivity-index"];
/// The GSI finding a user by email.
pub const EMAIL_INDEX: &str = "email-index";
/// The local secondary index finding a turn by its idempotency key.
pub const TURN_KEY_INDEX: &str = "turnKey-index";
/// The attribute DynamoDB's TTL deletes by (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "ttl";

/// What cmz needs of one table. Every index key is a string attribute.
struct Spec {
    hash: (&'static str, ScalarAttributeType),
    range: Option<(&'static str, ScalarAttributeType)>,
    /// Global secondary indexes. These can be added in place.
    indexes: &'static [Gsi],
    /// Indexes of earlier versions that this one no longer reads (see [`RETIRED_INDEXES`]).
    retired_indexes: &'static [&'static str],
    /// Local secondary indexes: name, range key. DynamoDB makes these only with the
    /// table, so only cmz's own new tables (never a legacy one) may have them.
    local_indexes: &'static [(&'static str, &'static str)],
    /// Whether DynamoDB's TTL should delete by [`TTL_ATTRIBUTE`].
    ttl: bool,
}

/// A global secondary index: name, hash key, range key, what it projects.
type Gsi = (&'static str, &'static str, Option<&'static str>, Projected);

/// What an index carries besides its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Projected {
    /// Every attribute: a query answers from the index alone, and every change of the
    /// item is also a write to the index.
    All,
    /// The table's and the index's keys only: a query reads the items from the table,
    /// and changes of other attributes never write to the index.
    KeysOnly,
}

impl Projected {
    fn projection(self) -> Projection {
        Projection::builder().projection_type(self.kind()).build()
    }

    fn kind(self) -> ProjectionType {
        match self {
            Self::All => ProjectionType::All,
            Self::KeysOnly => ProjectionType::KeysOnly,
        }
    }
}

fn specs(names: &TableNames) -> Vec<(&str, &'static str, Spec)> {
    use ScalarAttributeType::{N, S};
    let [conv, sess, msgs, users, fams, animals, meta, care] = names.all();
    vec![
        (
            conv.1,
            conv.0,
            Spec {
                hash: ("conversationId", S),
                range: None,
                indexes: &[],
                retired_indexes: &[],
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
                    (USER_INDEX, "userId", Some("lastActivity"), Projected::All),
                    (
                        ANIMAL_INDEX,
                        "animalId",
                        Some("startTime"),
                        Projected::KeysOnly,
                    ),
                ],
                retired_indexes: RETIRED_INDEXES,
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
                retired_indexes: &[],
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
                indexes: &[(EMAIL_INDEX, "email", None, Projected::All)],
                retired_indexes: &[],
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
                retired_indexes: &[],
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
                retired_indexes: &[],
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
                retired_indexes: &[],
                local_indexes: &[],
                ttl: true,
            },
        ),
        (
            care.1,
            care.0,
            Spec {
                hash: ("pk", S),
                range: Some(("sk", S)),
                indexes: &[],
                retired_indexes: &[],
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
        .map_err(|e| Error::internal("key schema").with_source(e))
}

fn attr(name: &str, kind: ScalarAttributeType) -> Result<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .map_err(|e| Error::internal("attribute definition").with_source(e))
}

fn index_keys(hash: &str, range: Option<&str>) -> Result<Vec<KeySchemaElement>> {
    let mut keys = vec![key(hash, KeyType::Hash)?];
    if let Some(range) = range {
        keys.push(key(range, KeyType::Range)?);
    }
    Ok(keys)
}

/// Creates every missing table and brings every existing one up to date in place, then
/// returns what it changed; what cannot be done in place (a wrong key schema, a missing
/// local secondary index) is an error listing it (see [`TablesReport::into_result`]).
///
/// This is [`ensure_tables_with_progress`] without a progress callback: progress goes to
/// `tracing` (`info`) only.
pub async fn ensure_tables(client: &Client, names: &TableNames) -> Result<TablesReport> {
    ensure_tables_with_progress(client, names, &|_| {})
        .await?
        .into_result()
}

/// Creates every missing table of `names` and brings existing ones (a legacy
/// deployment's, made without cmz's indexes) up to date in place, reporting progress to
/// `progress` and to `tracing`.
///
/// - A missing table is created with its indexes, on-demand.
/// - A missing global secondary index is added with `UpdateTable`, one at a time (as
///   DynamoDB requires), billed like its table (a provisioned table's index gets the
///   table's read and write units), and waited for until DynamoDB has filled it from the
///   existing items and reports it `ACTIVE`. A run that is stopped while waiting can be
///   started again: it waits for the index it started.
/// - TTL on [`TTL_ATTRIBUTE`] is turned on where cmz wants it and it is off.
///
/// Nothing is ever rewritten or deleted: not an item, an index or a setting (but a retired
/// index of cmz's own, when [`EnsureOptions::remove_retired_indexes`] asks for it). A
/// second run changes nothing and reports no changes. An index cmz no longer reads is a
/// warning in [`TablesReport::warnings`]. What cannot be done in place is not attempted
/// and comes back in [`TablesReport::problems`]: a table whose keys are not cmz's
/// (DynamoDB cannot change keys), a missing local secondary index (DynamoDB makes those
/// only with the table, so only cmz's own new tables have them), an index of cmz's name
/// with other keys. The other tables are still brought up to date. Errors are for
/// DynamoDB failing (`unavailable`) or a wait that did not end (`unavailable`).
pub async fn ensure_tables_with_progress(
    client: &Client,
    names: &TableNames,
    progress: &(dyn Fn(&TableEvent) + Sync),
) -> Result<TablesReport> {
    ensure_tables_with_options(client, names, EnsureOptions::default(), progress).await
}

/// What [`ensure_tables_with_options`] may do beyond adding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnsureOptions {
    /// Delete the indexes of [`RETIRED_INDEXES`] that a table still has, once the index
    /// that replaces them is `ACTIVE` (the only deletion ensure-tables ever makes, and only
    /// when asked). Ask once every cmz server runs this version: an older one still
    /// reads them. Without it they are reported as warnings, with what they cost.
    pub remove_retired_indexes: bool,
}

impl EnsureOptions {
    /// Options that also delete retired indexes (see
    /// [`remove_retired_indexes`](Self::remove_retired_indexes)).
    pub fn removing_retired_indexes() -> Self {
        Self {
            remove_retired_indexes: true,
        }
    }
}

/// [`ensure_tables_with_progress`] with [`EnsureOptions`].
#[tracing::instrument(name = "dynamodb.ensure_tables", skip_all)]
pub async fn ensure_tables_with_options(
    client: &Client,
    names: &TableNames,
    options: EnsureOptions,
    progress: &(dyn Fn(&TableEvent) + Sync),
) -> Result<TablesReport> {
    let existing = list_tables(client).await?;
    let mut run = upgrade::Upgrade::new(client, options, progress);
    for (table, variable, spec) in specs(names) {
        if !existing.iter().any(|t| t == table) && create_table(client, table, &spec).await? {
            run.settle(table).await?;
            run.changed(TableChange::CreatedTable {
                table: table.to_owned(),
                variable,
            });
        }
        run.upgrade(table, variable, &spec).await?;
    }
    let report = run.finish();
    if report.is_unchanged() && report.problems.is_empty() {
        tracing::info!("DynamoDB tables are up to date: nothing to change");
    }
    Ok(report)
}

/// Creates `table` with its keys and indexes, on-demand; `false` when another process
/// created it first.
#[tracing::instrument(name = "dynamodb.create_table", skip_all, fields(table = %table))]
async fn create_table(client: &Client, table: &str, spec: &Spec) -> Result<bool> {
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
    for (index, hash, range, projected) in spec.indexes {
        for name in std::iter::once(*hash).chain(*range) {
            if !defs.iter().any(|d| d.attribute_name() == name) {
                defs.push(attr(name, ScalarAttributeType::S)?);
            }
        }
        request = request.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(*index)
                .set_key_schema(Some(index_keys(hash, *range)?))
                .projection(projected.projection())
                .build()
                .map_err(|e| Error::internal("index definition").with_source(e))?,
        );
    }
    for (index, range) in spec.local_indexes {
        if !defs.iter().any(|d| d.attribute_name() == *range) {
            defs.push(attr(range, ScalarAttributeType::S)?);
        }
        request = request.local_secondary_indexes(
            LocalSecondaryIndex::builder()
                .index_name(*index)
                .set_key_schema(Some(index_keys(spec.hash.0, Some(range))?))
                .projection(Projected::All.projection())
                .build()
                .map_err(|e| Error::internal("index definition").with_source(e))?,
        );
    }
    match request.set_attribute_definitions(Some(defs)).send().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(false)
        }
        Err(e) => Err(map_sdk("CreateTable", table, e)),
    }
}

#[tracing::instrument(name = "dynamodb.describe_table", skip_all, fields(table = %table))]
async fn describe(client: &Client, table: &str) -> Result<TableDescription> {
    client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| map_sdk("DescribeTable", table, e))?
        .table
        .ok_or_else(|| Error::internal(format!("DescribeTable on {table} described no table")))
}

#[tracing::instrument(name = "dynamodb.list_tables", skip_all)]
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

/// How to run [`ENSURE_TABLES_COMMAND`], for error messages.
fn fix_command() -> String {
    format!(
        "`{ENSURE_TABLES_COMMAND}` (or the installed `cmz-dynamo ensure-tables`) with the same variables"
    )
}

/// Checks at startup that every configured table exists with the keys and indexes cmz
/// uses, and that no index of cmz's is still being built.
///
/// Every problem found is listed in one `validation_error` (its field the first table's
/// variable). A missing table is named with the variable that configures it and the
/// existing tables with similar names (`quest-dev-conversations` vs
/// `quest-dev-conversation`); a missing table or index names the fix, the command
/// [`ENSURE_TABLES_COMMAND`], which adds indexes in place and keeps every item. An
/// unreachable endpoint is `unavailable`.
#[tracing::instrument(name = "dynamodb.check_tables", skip_all)]
pub async fn check_tables(client: &Client, names: &TableNames) -> Result<()> {
    let existing = list_tables(client).await?;
    let mut problems = Vec::new();
    let mut problem = |table: &str, variable: &'static str, message: String| {
        problems.push(TableProblem {
            table: table.to_owned(),
            variable,
            message,
        })
    };
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
            problem(
                table,
                variable,
                format!(
                    "does not exist; {hint}. If the name is right, create it with {}",
                    fix_command()
                ),
            );
            continue;
        }
        let plan = upgrade::plan(&spec, &describe(client, table).await?);
        for message in plan.problems {
            problem(table, variable, message);
        }
        for &(index, hash, range, _) in plan.missing {
            problem(
                table,
                variable,
                format!(
                    "has no GSI {index:?} ({}); add it in place, keeping every item, with {}",
                    upgrade::describe_keys(Some(hash), range, None),
                    fix_command()
                ),
            );
        }
        for index in plan.retired {
            tracing::warn!(
                table,
                index,
                "a retired index of cmz's costs write units on every turn; remove it with \
                 `cmz-dynamo ensure-tables --remove-retired-indexes` once every server runs this version"
            );
        }
        for (index, status) in plan.pending {
            problem(
                table,
                variable,
                format!(
                    "has GSI {index:?} still being built ({status}); {} waits for it and shows its progress",
                    fix_command()
                ),
            );
        }
    }
    match problems.first() {
        None => Ok(()),
        Some(first) => Err(Error::validation(
            first.variable,
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
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
