//! What [`ensure_tables`](crate::ensure_tables) changed, what it could not change, and
//! its progress while it waits for DynamoDB.

use std::fmt;
use std::time::Duration;

use cmz_core::{Error, Result};

/// The command that creates cmz's tables and brings existing ones up to date.
pub const ENSURE_TABLES_COMMAND: &str = "cargo run -p cmz-dynamo -- ensure-tables";

/// How a new index is billed: like the table it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexBilling {
    /// The table is on-demand (`PAY_PER_REQUEST`), and so is the index.
    OnDemand,
    /// The table has provisioned capacity; the index got the same units as the table.
    Provisioned {
        /// Read capacity units.
        read_units: i64,
        /// Write capacity units.
        write_units: i64,
    },
}

/// One change [`ensure_tables`](crate::ensure_tables) made. It only ever adds (no item,
/// index or table is rewritten or deleted), but for a retired index of cmz's own, removed
/// when [`EnsureOptions::remove_retired_indexes`](crate::EnsureOptions) asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableChange {
    /// Created a table that did not exist, with its indexes (on-demand billing).
    CreatedTable {
        /// The table.
        table: String,
        /// The variable that names it (`CMZ_META_TABLE_NAME`, ...).
        variable: &'static str,
    },
    /// Added a global secondary index to an existing table and waited until DynamoDB had
    /// filled it from the existing items (`ACTIVE`).
    AddedIndex {
        /// The table.
        table: String,
        /// The index.
        index: String,
        /// How it is billed.
        billing: IndexBilling,
    },
    /// Deleted an index of cmz's that this version no longer reads
    /// ([`RETIRED_INDEXES`](crate::RETIRED_INDEXES)), and waited until it was gone.
    RemovedRetiredIndex {
        /// The table.
        table: String,
        /// The index.
        index: String,
    },
    /// Turned DynamoDB's TTL on.
    EnabledTtl {
        /// The table.
        table: String,
        /// The attribute TTL deletes by ([`TTL_ATTRIBUTE`](crate::TTL_ATTRIBUTE)).
        attribute: String,
    },
}

impl fmt::Display for TableChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreatedTable { table, variable } => {
                write!(f, "created table {table} ({variable})")
            }
            Self::AddedIndex {
                table,
                index,
                billing,
            } => {
                write!(f, "added GSI {index} to table {table}")?;
                match billing {
                    IndexBilling::OnDemand => write!(f, " (on-demand)"),
                    IndexBilling::Provisioned {
                        read_units,
                        write_units,
                    } => write!(
                        f,
                        " (provisioned like the table: {read_units} RCU, {write_units} WCU)"
                    ),
                }
            }
            Self::RemovedRetiredIndex { table, index } => write!(
                f,
                "removed retired GSI {index} from table {table} (cmz no longer reads it; it cost \
                 write units on every turn)"
            ),
            Self::EnabledTtl { table, attribute } => {
                write!(f, "turned on TTL (attribute {attribute}) for table {table}")
            }
        }
    }
}

/// Something about a table that [`ensure_tables`](crate::ensure_tables) cannot or will not
/// change in place, with the reason and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableProblem {
    /// The table.
    pub table: String,
    /// The variable that names it.
    pub variable: &'static str,
    /// What is wrong and what to do, for people; starts with a verb ("has ...").
    pub message: String,
}

impl fmt::Display for TableProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DynamoDB table {:?} ({}) {}",
            self.table, self.variable, self.message
        )
    }
}

/// What [`ensure_tables`](crate::ensure_tables) did: the changes in the order it made
/// them, and what it could not do. A run on tables that are already up to date reports no
/// changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TablesReport {
    /// The changes made.
    pub changes: Vec<TableChange>,
    /// What cmz needs and cannot be done in place (a wrong key schema, a missing local
    /// secondary index, an index of cmz's name with other keys): cmz cannot run on these
    /// tables until someone fixes them.
    pub problems: Vec<TableProblem>,
    /// What cmz would like and leaves alone, without which it still runs (TTL on an
    /// attribute other than `ttl`).
    pub warnings: Vec<TableProblem>,
}

impl TablesReport {
    /// Whether nothing was changed.
    pub fn is_unchanged(&self) -> bool {
        self.changes.is_empty()
    }

    /// The report, or a `validation_error` listing the [`problems`](Self::problems) (and
    /// the changes made before them) when there are any.
    pub fn into_result(self) -> Result<Self> {
        let Some(first) = self.problems.first() else {
            return Ok(self);
        };
        let problems: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        let made = if self.changes.is_empty() {
            "nothing was changed".to_owned()
        } else {
            let changes: Vec<String> = self.changes.iter().map(ToString::to_string).collect();
            format!("changes made: {}", changes.join("; "))
        };
        Err(Error::validation(
            first.variable,
            format!(
                "DynamoDB tables need changes cmz cannot make in place: {} ({made})",
                problems.join("; ")
            ),
        ))
    }
}

impl fmt::Display for TablesReport {
    /// One line per change (or `nothing to change`), then one per warning and problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            write!(f, "nothing to change")?;
        }
        for (i, change) in self.changes.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{change}")?;
        }
        for warning in &self.warnings {
            write!(f, "\nwarning: {warning}")?;
        }
        for problem in &self.problems {
            write!(f, "\nerror: {problem}")?;
        }
        Ok(())
    }
}

/// Progress of [`ensure_tables_with_progress`](crate::ensure_tables_with_progress), for
/// people watching: adding an index to a large table takes minutes to hours.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableEvent {
    /// A change is being made (an index added: DynamoDB now fills it from the items).
    Changing(TableChange),
    /// Still waiting for DynamoDB to finish a table or an index.
    Waiting {
        /// The table.
        table: String,
        /// The index being built, or `None` while the table itself is not `ACTIVE`.
        index: Option<String>,
        /// The status DynamoDB reports (`CREATING`, `UPDATING`, ...).
        status: String,
        /// Whether DynamoDB is still copying existing items into the index.
        backfilling: bool,
        /// Items in the index so far, as DynamoDB reports it (updated about every six
        /// hours on AWS, so often zero while building).
        items: Option<i64>,
        /// Time waited so far.
        elapsed: Duration,
    },
    /// A change is done.
    Changed(TableChange),
}

impl fmt::Display for TableEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Changing(TableChange::AddedIndex { table, index, .. }) => write!(
                f,
                "adding GSI {index} to table {table}; DynamoDB fills it from the existing items"
            ),
            Self::Changing(change) => write!(f, "{change} (in progress)"),
            Self::Waiting {
                table,
                index,
                status,
                backfilling,
                items,
                elapsed,
            } => {
                match index {
                    Some(index) => write!(f, "waiting for GSI {index} of table {table}: {status}")?,
                    None => write!(f, "waiting for table {table}: {status}")?,
                }
                if *backfilling {
                    write!(f, ", backfilling")?;
                }
                if let Some(items) = items.filter(|n| *n > 0) {
                    write!(f, ", {items} items")?;
                }
                write!(f, " ({:.1} s)", elapsed.as_secs_f64())
            }
            Self::Changed(change) => write!(f, "{change}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_lists_changes_or_says_nothing_changed() {
        let mut report = TablesReport::default();
        assert_eq!(report.to_string(), "nothing to change");
        assert!(report.clone().into_result().is_ok());
        report.changes.push(TableChange::AddedIndex {
            table: "quest-dev-session".into(),
            index: "userId-lastActivity-index".into(),
            billing: IndexBilling::Provisioned {
                read_units: 5,
                write_units: 5,
            },
        });
        report.changes.push(TableChange::EnabledTtl {
            table: "quest-dev-session".into(),
            attribute: "ttl".into(),
        });
        assert_eq!(
            report.to_string(),
            "added GSI userId-lastActivity-index to table quest-dev-session (provisioned like the table: 5 RCU, 5 WCU)\n\
             turned on TTL (attribute ttl) for table quest-dev-session"
        );
        report.problems.push(TableProblem {
            table: "quest-dev-conversation".into(),
            variable: "CONVERSATION_DYNAMO_TABLE_NAME",
            message: "has the wrong keys".into(),
        });
        let error = report.into_result().unwrap_err();
        assert_eq!(error.code(), "validation_error");
        let message = error.to_string();
        assert!(
            message.contains(
                "\"quest-dev-conversation\" (CONVERSATION_DYNAMO_TABLE_NAME) has the wrong keys"
            ) && message.contains("changes made: added GSI userId-lastActivity-index"),
            "{message}"
        );
    }
}
