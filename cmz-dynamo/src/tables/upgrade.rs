//! Bringing an existing table up to date in place: what it lacks, adding global secondary
//! indexes and turning TTL on, and waiting for DynamoDB to finish.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use aws_sdk_dynamodb::types::{
    BillingMode, CreateGlobalSecondaryIndexAction, DeleteGlobalSecondaryIndexAction,
    GlobalSecondaryIndexDescription, GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement,
    KeyType, ProvisionedThroughput, ScalarAttributeType, TableDescription, TableStatus,
    TimeToLiveSpecification, TimeToLiveStatus,
};
use cmz_core::{Error, Result};

use super::{
    EnsureOptions, Gsi, IndexBilling, Spec, TTL_ATTRIBUTE, TableChange, TableEvent, TableProblem,
    TablesReport, attr, describe, index_keys,
};
use crate::error::map_sdk;

/// How long to wait for DynamoDB to build an index before giving up. Filling an index
/// from a large table takes hours; a run stopped by this limit can simply be started
/// again, and waits for the same index.
const WAIT_LIMIT: Duration = Duration::from_secs(12 * 3600);
/// The longest pause between two looks at a table being changed.
const LONGEST_POLL: Duration = Duration::from_secs(10);
/// Tries to add one index while other processes change the same table.
const ADD_ATTEMPTS: usize = 10;

/// What an existing table lacks, compared with its [`Spec`].
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Global secondary indexes to add.
    pub(super) missing: Vec<&'static Gsi>,
    /// Indexes of cmz's that exist but are still being built: name and status.
    pub(super) pending: Vec<(String, String)>,
    /// Retired indexes of cmz's that the table still has.
    pub(super) retired: Vec<&'static str>,
    /// What cannot be done in place, for people (each starts with a verb).
    pub(super) problems: Vec<String>,
    /// Whether the keys are cmz's: when not, cmz leaves the table alone entirely.
    pub(super) keys_match: bool,
}

/// The hash and range key names of a key schema.
fn keys_of(schema: &[KeySchemaElement]) -> (Option<&str>, Option<&str>) {
    let find = |kind: KeyType| {
        schema
            .iter()
            .find(|k| k.key_type() == &kind)
            .map(|k| k.attribute_name())
    };
    (find(KeyType::Hash), find(KeyType::Range))
}

/// `hash userId (S), range lastActivity (S)`, with types when `types` knows them.
pub(super) fn describe_keys(
    hash: Option<&str>,
    range: Option<&str>,
    types: Option<&HashMap<&str, &ScalarAttributeType>>,
) -> String {
    let one = |role: &str, name: &str| {
        let kind = types
            .and_then(|t| t.get(name))
            .map(|t| format!(" ({})", t.as_str()))
            .unwrap_or_default();
        format!("{role} {name}{kind}")
    };
    let mut out = match hash {
        Some(hash) => one("hash", hash),
        None => "no hash key".to_owned(),
    };
    if let Some(range) = range {
        out.push_str(", ");
        out.push_str(&one("range", range));
    }
    out
}

/// Whether `table` has a global secondary index named `name` (in any state).
fn has_index(table: &TableDescription, name: &str) -> bool {
    table
        .global_secondary_indexes()
        .iter()
        .any(|g| g.index_name() == Some(name))
}

fn is_building(index: &GlobalSecondaryIndexDescription) -> bool {
    index.index_status() != Some(&IndexStatus::Active) || index.backfilling() == Some(true)
}

fn status_of(index: &GlobalSecondaryIndexDescription) -> String {
    index
        .index_status()
        .map_or("UNKNOWN", |s| s.as_str())
        .to_owned()
}

/// Compares `table` with what cmz needs of it.
pub(super) fn plan(spec: &Spec, table: &TableDescription) -> Plan {
    let mut plan = Plan::default();
    let types: HashMap<&str, &ScalarAttributeType> = table
        .attribute_definitions()
        .iter()
        .map(|d| (d.attribute_name(), d.attribute_type()))
        .collect();

    let (hash, range) = keys_of(table.key_schema());
    let wanted_range = spec.range.as_ref().map(|(name, _)| *name);
    let typed = |name: &str, kind: &ScalarAttributeType| types.get(name) == Some(&kind);
    plan.keys_match = hash == Some(spec.hash.0)
        && range == wanted_range
        && typed(spec.hash.0, &spec.hash.1)
        && spec
            .range
            .as_ref()
            .is_none_or(|(name, kind)| typed(name, kind));
    if !plan.keys_match {
        let wanted_types: HashMap<&str, &ScalarAttributeType> = std::iter::once(&spec.hash)
            .chain(&spec.range)
            .map(|(name, kind)| (*name, kind))
            .collect();
        plan.problems.push(format!(
            "has the keys {}, but cmz needs {}. DynamoDB cannot change the keys of a table, so this \
             cannot be done in place: set the variable to a table with cmz's keys (ensure-tables \
             creates it when no table has that name) and leave this one as it is",
            describe_keys(hash, range, Some(&types)),
            describe_keys(Some(spec.hash.0), wanted_range, Some(&wanted_types)),
        ));
        return plan;
    }

    for &retired in spec.retired_indexes {
        if has_index(table, retired) {
            plan.retired.push(retired);
        }
    }
    for gsi in spec.indexes {
        let (name, hash, range, projected) = *gsi;
        let found = table
            .global_secondary_indexes()
            .iter()
            .find(|g| g.index_name() == Some(name));
        match found {
            Some(found) => {
                let (has_hash, has_range) = keys_of(found.key_schema());
                let projection = found.projection().and_then(|p| p.projection_type());
                if (has_hash, has_range) != (Some(hash), range)
                    || projection != Some(&projected.kind())
                {
                    plan.problems.push(format!(
                        "has a GSI {name:?} on {} projecting {}, but cmz needs it on {} projecting \
                         {}. DynamoDB cannot change an index and cmz never deletes one: delete \
                         this index yourself if nothing else uses it, then run ensure-tables again",
                        describe_keys(has_hash, has_range, None),
                        projection.map_or("nothing", |p| p.as_str()),
                        describe_keys(Some(hash), range, None),
                        projected.kind().as_str(),
                    ));
                } else if is_building(found) {
                    plan.pending.push((name.to_owned(), status_of(found)));
                }
            }
            None => {
                let conflict = std::iter::once(hash).chain(range).find_map(|a| {
                    types
                        .get(a)
                        .filter(|t| ***t != ScalarAttributeType::S)
                        .map(|t| (a, t))
                });
                match conflict {
                    Some((attribute, kind)) => plan.problems.push(format!(
                        "needs a GSI {name:?} keyed on {attribute} as a string (S), but the table \
                         defines {attribute} as {}; DynamoDB cannot change an attribute's \
                         definition, so this cannot be done in place",
                        kind.as_str()
                    )),
                    None => plan.missing.push(gsi),
                }
            }
        }
    }

    for (name, range) in spec.local_indexes {
        let found = table
            .local_secondary_indexes()
            .iter()
            .find(|l| l.index_name() == Some(name));
        let wanted = (Some(spec.hash.0), Some(*range));
        match found {
            Some(found) if keys_of(found.key_schema()) == wanted => {}
            Some(found) => {
                let (has_hash, has_range) = keys_of(found.key_schema());
                plan.problems.push(format!(
                    "has a local secondary index {name:?} on {}, but cmz needs it on {}. DynamoDB \
                     makes local secondary indexes only with their table, so this cannot be done \
                     in place",
                    describe_keys(has_hash, has_range, None),
                    describe_keys(wanted.0, wanted.1, None),
                ));
            }
            None => plan.problems.push(format!(
                "has no local secondary index {name:?} ({}). DynamoDB makes local secondary \
                 indexes only with their table, so it cannot be added in place. This is one of \
                 cmz's own tables, which a legacy deployment does not have: if it holds nothing \
                 yet, delete it and run ensure-tables again, which creates it with the index",
                describe_keys(wanted.0, wanted.1, None),
            )),
        }
    }
    plan
}

/// How a new index on `table` must be billed: like the table.
fn billing_of(table: &TableDescription) -> IndexBilling {
    let on_demand = table.billing_mode_summary().and_then(|b| b.billing_mode())
        == Some(&BillingMode::PayPerRequest);
    if on_demand {
        return IndexBilling::OnDemand;
    }
    let throughput = table.provisioned_throughput();
    IndexBilling::Provisioned {
        read_units: throughput
            .and_then(|t| t.read_capacity_units())
            .unwrap_or(1)
            .max(1),
        write_units: throughput
            .and_then(|t| t.write_capacity_units())
            .unwrap_or(1)
            .max(1),
    }
}

/// One run of `ensure_tables`: the client, where progress goes, and the report so far.
pub(super) struct Upgrade<'a> {
    client: &'a Client,
    options: EnsureOptions,
    progress: &'a (dyn Fn(&TableEvent) + Sync),
    report: TablesReport,
}

impl<'a> Upgrade<'a> {
    pub(super) fn new(
        client: &'a Client,
        options: EnsureOptions,
        progress: &'a (dyn Fn(&TableEvent) + Sync),
    ) -> Self {
        Self {
            client,
            options,
            progress,
            report: TablesReport::default(),
        }
    }

    pub(super) fn finish(self) -> TablesReport {
        self.report
    }

    fn emit(&self, event: TableEvent) {
        tracing::info!("{event}");
        (self.progress)(&event);
    }

    pub(super) fn changed(&mut self, change: TableChange) {
        self.emit(TableEvent::Changed(change.clone()));
        self.report.changes.push(change);
    }

    fn problem(&mut self, table: &str, variable: &'static str, message: String, fatal: bool) {
        let problem = TableProblem {
            table: table.to_owned(),
            variable,
            message,
        };
        if fatal {
            tracing::error!("{problem}");
            self.report.problems.push(problem);
        } else {
            tracing::warn!("{problem}");
            self.report.warnings.push(problem);
        }
    }

    /// Adds what `table` lacks of `spec`, as far as that can be done in place.
    pub(super) async fn upgrade(
        &mut self,
        table: &str,
        variable: &'static str,
        spec: &Spec,
    ) -> Result<()> {
        let described = self.settle(table).await?;
        let plan = plan(spec, &described);
        for message in plan.problems {
            self.problem(table, variable, message, true);
        }
        if !plan.keys_match {
            return Ok(());
        }
        for gsi in plan.missing {
            self.add_index(table, gsi).await?;
        }
        for index in plan.retired {
            if self.options.remove_retired_indexes {
                self.remove_index(table, index).await?;
            } else {
                self.problem(
                    table,
                    variable,
                    format!(
                        "has GSI {index:?}, which this version of cmz no longer reads and which \
                         costs write units on every turn; once every cmz server runs this \
                         version, remove it with `cmz-dynamo ensure-tables \
                         --remove-retired-indexes`"
                    ),
                    false,
                );
            }
        }
        if spec.ttl {
            self.ensure_ttl(table, variable).await?;
        }
        Ok(())
    }

    /// Waits until `table` is `ACTIVE` and none of its indexes is being built or changed,
    /// reporting progress; returns its description then.
    pub(super) async fn settle(&self, table: &str) -> Result<TableDescription> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            let described = describe(self.client, table).await?;
            let building = described
                .global_secondary_indexes()
                .iter()
                .find(|g| is_building(g));
            let table_active = described.table_status() == Some(&TableStatus::Active);
            if table_active && building.is_none() {
                return Ok(described);
            }
            if started.elapsed() > WAIT_LIMIT {
                return Err(Error::unavailable(
                    format!(
                        "table {table} was still being changed after {} hours; run ensure-tables \
                         again to keep waiting (nothing is lost)",
                        WAIT_LIMIT.as_secs() / 3600
                    ),
                    std::io::Error::other("DynamoDB table or index not ACTIVE"),
                ));
            }
            let event = match building {
                Some(index) => TableEvent::Waiting {
                    table: table.to_owned(),
                    index: index.index_name().map(str::to_owned),
                    status: status_of(index),
                    backfilling: index.backfilling() == Some(true),
                    items: index.item_count(),
                    elapsed: started.elapsed(),
                },
                None => TableEvent::Waiting {
                    table: table.to_owned(),
                    index: None,
                    status: described
                        .table_status()
                        .map_or("UNKNOWN", |s| s.as_str())
                        .to_owned(),
                    backfilling: false,
                    items: None,
                    elapsed: started.elapsed(),
                },
            };
            self.emit(event);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_POLL);
        }
    }

    /// Adds one global secondary index and waits until DynamoDB has built it. Another
    /// process adding the same index (two servers starting at once) is waited for, not
    /// reported as a change of this run.
    async fn add_index(&mut self, table: &str, gsi: &'static Gsi) -> Result<()> {
        let name = gsi.0;
        for _ in 0..ADD_ATTEMPTS {
            let described = self.settle(table).await?;
            if has_index(&described, name) {
                return Ok(());
            }
            let billing = billing_of(&described);
            let change = TableChange::AddedIndex {
                table: table.to_owned(),
                index: name.to_owned(),
                billing,
            };
            self.emit(TableEvent::Changing(change.clone()));
            match self.send_add_index(table, gsi, billing).await {
                Ok(true) => {
                    self.settle(table).await?;
                    self.changed(change);
                    return Ok(());
                }
                // Someone else is changing the table: look again.
                Ok(false) => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::unavailable(
            format!(
                "could not add GSI {name} to table {table}: another change of the table was in \
                 progress {ADD_ATTEMPTS} times; run ensure-tables again"
            ),
            std::io::Error::other("UpdateTable kept failing: the table was busy"),
        ))
    }

    /// Deletes a retired index (after everything this run added is `ACTIVE`) and waits
    /// until DynamoDB has dropped it.
    #[tracing::instrument(name = "dynamodb.update_table", skip_all, fields(table = %table, index = name))]
    async fn remove_index(&mut self, table: &str, name: &'static str) -> Result<()> {
        for _ in 0..ADD_ATTEMPTS {
            let described = self.settle(table).await?;
            if !has_index(&described, name) {
                return Ok(());
            }
            let change = TableChange::RemovedRetiredIndex {
                table: table.to_owned(),
                index: name.to_owned(),
            };
            self.emit(TableEvent::Changing(change.clone()));
            let action = DeleteGlobalSecondaryIndexAction::builder()
                .index_name(name)
                .build()
                .map_err(|e| Error::internal("index deletion").with_source(e))?;
            let sent = self
                .client
                .update_table()
                .table_name(table)
                .global_secondary_index_updates(
                    GlobalSecondaryIndexUpdate::builder().delete(action).build(),
                )
                .send()
                .await;
            match sent {
                // `settle` waits while the index is DELETING, that is until it is gone.
                Ok(_) => {
                    self.settle(table).await?;
                    self.changed(change);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.code(),
                        Some("LimitExceededException" | "ResourceInUseException")
                    ) =>
                {
                    tracing::info!(table, index = name, "the table is busy; looking again");
                }
                // Someone else deleted it first.
                Err(e) if e.code() == Some("ResourceNotFoundException") => return Ok(()),
                Err(e) => return Err(map_sdk("UpdateTable", table, e)),
            }
        }
        Err(Error::unavailable(
            format!(
                "could not remove GSI {name} from table {table}: another change of the table was \
                 in progress {ADD_ATTEMPTS} times; run ensure-tables again"
            ),
            std::io::Error::other("UpdateTable kept failing: the table was busy"),
        ))
    }

    /// One `UpdateTable` creating `gsi`; `false` when DynamoDB refused it because another
    /// change of the table was in progress or the index was just created by someone else.
    #[tracing::instrument(name = "dynamodb.update_table", skip_all, fields(table = %table, index = gsi.0))]
    async fn send_add_index(
        &self,
        table: &str,
        gsi: &'static Gsi,
        billing: IndexBilling,
    ) -> Result<bool> {
        let (name, hash, range, projected) = *gsi;
        let mut action = CreateGlobalSecondaryIndexAction::builder()
            .index_name(name)
            .set_key_schema(Some(index_keys(hash, range)?))
            .projection(projected.projection());
        if let IndexBilling::Provisioned {
            read_units,
            write_units,
        } = billing
        {
            action = action.provisioned_throughput(
                ProvisionedThroughput::builder()
                    .read_capacity_units(read_units)
                    .write_capacity_units(write_units)
                    .build()
                    .map_err(|e| Error::internal("index throughput").with_source(e))?,
            );
        }
        let action = action
            .build()
            .map_err(|e| Error::internal("index definition").with_source(e))?;
        let mut request = self
            .client
            .update_table()
            .table_name(table)
            .global_secondary_index_updates(
                GlobalSecondaryIndexUpdate::builder().create(action).build(),
            );
        for attribute in std::iter::once(hash).chain(range) {
            request = request.attribute_definitions(attr(attribute, ScalarAttributeType::S)?);
        }
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let code = e.code().unwrap_or_default();
                let message = e.message().unwrap_or_default().to_ascii_lowercase();
                let busy = matches!(code, "LimitExceededException" | "ResourceInUseException")
                    || (code == "ValidationException" && message.contains("already exist"));
                if busy {
                    tracing::info!(
                        table,
                        index = name,
                        code,
                        "the table is being changed by someone else; looking again"
                    );
                    Ok(false)
                } else {
                    Err(map_sdk("UpdateTable", table, e))
                }
            }
        }
    }

    /// Turns TTL on [`TTL_ATTRIBUTE`] on when it is off. TTL on another attribute is left
    /// as it is (DynamoDB allows one per table) and reported as a warning.
    #[tracing::instrument(name = "dynamodb.update_time_to_live", skip_all, fields(table = %table))]
    async fn ensure_ttl(&mut self, table: &str, variable: &'static str) -> Result<()> {
        let described = self
            .client
            .describe_time_to_live()
            .table_name(table)
            .send()
            .await
            .map_err(|e| map_sdk("DescribeTimeToLive", table, e))?;
        let ttl = described.time_to_live_description();
        let status = ttl.and_then(|t| t.time_to_live_status());
        let attribute = ttl.and_then(|t| t.attribute_name());
        match status {
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
                if attribute == Some(TTL_ATTRIBUTE) =>
            {
                return Ok(());
            }
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling) => {
                self.problem(
                    table,
                    variable,
                    format!(
                        "has TTL on the attribute {:?}, but cmz sets {TTL_ATTRIBUTE:?} \
                         (CMZ_RETENTION_DAYS). DynamoDB allows one TTL attribute per table and \
                         ensure-tables does not change it, so cmz's retention deletes nothing \
                         in this table",
                        attribute.unwrap_or_default()
                    ),
                    false,
                );
                return Ok(());
            }
            Some(TimeToLiveStatus::Disabling) => {
                self.problem(
                    table,
                    variable,
                    "has TTL being turned off; DynamoDB turns it on again only once it is off \
                     (up to an hour): run ensure-tables again then"
                        .to_owned(),
                    false,
                );
                return Ok(());
            }
            _ => {}
        }
        let result = self
            .client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(TTL_ATTRIBUTE)
                    .enabled(true)
                    .build()
                    .map_err(|e| Error::internal("ttl").with_source(e))?,
            )
            .send()
            .await;
        match result {
            Ok(_) => {
                self.changed(TableChange::EnabledTtl {
                    table: table.to_owned(),
                    attribute: TTL_ATTRIBUTE.to_owned(),
                });
                Ok(())
            }
            // Another process turned it on in between.
            Err(e)
                if e.code() == Some("ValidationException")
                    && e.message()
                        .is_some_and(|m| m.to_ascii_lowercase().contains("already enabled")) =>
            {
                Ok(())
            }
            Err(e) => Err(map_sdk("UpdateTimeToLive", table, e)),
        }
    }
}
