//! The shared connection every DynamoDB store of cmz holds.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConsumedCapacity, ReturnConsumedCapacity, ReturnValue,
};
use cmz_core::Result;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::attr::Item;
use crate::config::{DynamoSettings, TableNames};
use crate::error::map_sdk;
use crate::tables::{TableEvent, TablesReport};
use crate::{
    DynamoCareStore, DynamoConversationStore, DynamoFamilyDirectory, DynamoPersonaDirectory,
    DynamoRateLimitStore, DynamoRevocationStore, DynamoUserStore, tables,
};

/// A DynamoDB connection with cmz's table names and settings; hands out the stores.
///
/// Cloning is cheap (one `Arc`); every store made from it shares its client and its
/// [`capacity`](Dynamo::capacity) meter.
#[derive(Clone)]
pub struct Dynamo {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) tables: TableNames,
    pub(crate) retention: Option<Duration>,
    pub(crate) cursor_key: Option<Vec<u8>>,
    pub(crate) meter: Meter,
}

impl fmt::Debug for Dynamo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dynamo")
            .field("tables", &self.inner.tables)
            .field("retention", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

impl Dynamo {
    /// Builds a client from `settings`. Makes no call: see [`check_tables`](Self::check_tables)
    /// and [`ensure_tables`](Self::ensure_tables).
    pub async fn connect(settings: DynamoSettings) -> Self {
        let client = settings.client().await;
        Self::with_client(client, settings)
    }

    /// Uses an SDK client you built; `settings` gives the tables, retention and cursor key.
    pub fn with_client(client: Client, settings: DynamoSettings) -> Self {
        // Without a configured secret, a key from the OS CSPRNG; if the OS cannot give one,
        // no key at all: listings that need a cursor then fail with `unavailable`, never
        // with a cursor signed by a weaker key.
        let cursor_key = match settings.cursor_secret.clone() {
            Some(secret) => Some(secret),
            None => {
                tracing::warn!(
                    "no CMZ_CURSOR_SECRET or JWT_SECRET: pagination cursors are signed with a random key and do not survive a restart"
                );
                match cmz_core::random::secret_bytes::<32>() {
                    Ok(key) => Some(key.to_vec()),
                    Err(error) => {
                        tracing::error!(%error, "no cursor-signing key: the OS CSPRNG failed");
                        None
                    }
                }
            }
        };
        Self {
            inner: Arc::new(Inner {
                client,
                tables: settings.tables,
                retention: settings.retention,
                cursor_key,
                meter: Meter::default(),
            }),
        }
    }

    /// Reads the settings from the environment (see [`DynamoSettings::from_env`]), connects
    /// and checks that every table exists ([`check_tables`](Self::check_tables)).
    pub async fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let dynamo = Self::connect(DynamoSettings::from_env(lookup)?).await;
        dynamo.check_tables().await?;
        Ok(dynamo)
    }

    /// Creates missing tables and brings existing ones (a legacy deployment's) up to date
    /// in place: missing GSIs and TTL settings, never rewriting or deleting anything.
    /// Returns what changed; what cannot be done in place is an error listing it. See
    /// [`ensure_tables_with_progress`](crate::ensure_tables_with_progress).
    pub async fn ensure_tables(&self) -> Result<TablesReport> {
        tables::ensure_tables(&self.inner.client, &self.inner.tables).await
    }

    /// [`ensure_tables`](Self::ensure_tables), telling `progress` what it does and waits
    /// for; what cannot be done in place comes back in [`TablesReport::problems`] instead
    /// of as an error (see [`TablesReport::into_result`]).
    pub async fn ensure_tables_with_progress(
        &self,
        progress: &(dyn Fn(&TableEvent) + Sync),
    ) -> Result<TablesReport> {
        tables::ensure_tables_with_progress(&self.inner.client, &self.inner.tables, progress).await
    }

    /// [`ensure_tables_with_progress`](Self::ensure_tables_with_progress) with
    /// [`EnsureOptions`](crate::EnsureOptions) (removing retired indexes).
    pub async fn ensure_tables_with_options(
        &self,
        options: tables::EnsureOptions,
        progress: &(dyn Fn(&TableEvent) + Sync),
    ) -> Result<TablesReport> {
        tables::ensure_tables_with_options(
            &self.inner.client,
            &self.inner.tables,
            options,
            progress,
        )
        .await
    }

    /// Checks that every configured table exists with the keys and indexes cmz needs (what
    /// the server does at startup); what is missing is an error naming the tables, the
    /// existing tables with similar names, and the fix (`cmz-dynamo ensure-tables`).
    pub async fn check_tables(&self) -> Result<()> {
        tables::check_tables(&self.inner.client, &self.inner.tables).await
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The table names in use.
    pub fn tables(&self) -> &TableNames {
        &self.inner.tables
    }

    /// Capacity and requests consumed so far by every store made from this connection.
    pub fn capacity(&self) -> CapacityReport {
        self.inner.meter.report()
    }

    /// The conversation store (sessions and messages).
    pub fn conversations(&self) -> DynamoConversationStore {
        DynamoConversationStore::new(self.clone())
    }

    /// The user store.
    pub fn users(&self) -> DynamoUserStore {
        DynamoUserStore::new(self.clone())
    }

    /// The family directory.
    pub fn families(&self) -> DynamoFamilyDirectory {
        DynamoFamilyDirectory::new(self.clone())
    }

    /// The persona directory (the animal table).
    pub fn personas(&self) -> DynamoPersonaDirectory {
        DynamoPersonaDirectory::new(self.clone())
    }

    /// Refresh tokens and revocations.
    pub fn revocations(&self) -> DynamoRevocationStore {
        DynamoRevocationStore::new(self.clone())
    }

    /// Shared rate-limit counters.
    pub fn rate_limits(&self) -> DynamoRateLimitStore {
        DynamoRateLimitStore::new(self.clone())
    }

    /// Usage counters, feedback and the review queue (the care table).
    pub fn care(&self) -> DynamoCareStore {
        DynamoCareStore::new(self.clone())
    }

    /// One strongly consistent `GetItem` by a string hash key, its capacity metered.
    pub(crate) async fn get_item(
        &self,
        table: &str,
        key: &str,
        value: &str,
    ) -> Result<Option<Item>> {
        let out = self
            .inner
            .client
            .get_item()
            .table_name(table)
            .key(key, AttributeValue::S(value.to_owned()))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", table, e))?;
        self.inner.meter.record(out.consumed_capacity(), false);
        Ok(out.item)
    }

    /// One `DeleteItem` by a string hash key; the item it removed, if there was one.
    pub(crate) async fn delete_item(
        &self,
        table: &str,
        key: &str,
        value: &str,
    ) -> Result<Option<Item>> {
        let out = self
            .inner
            .client
            .delete_item()
            .table_name(table)
            .key(key, AttributeValue::S(value.to_owned()))
            .return_values(ReturnValue::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("DeleteItem", table, e))?;
        self.inner.meter.record(out.consumed_capacity(), true);
        Ok(out.attributes.filter(|a| !a.is_empty()))
    }

    pub(crate) fn ttl(&self) -> Option<i64> {
        self.inner
            .retention
            .map(|r| chrono::Utc::now().timestamp() + r.as_secs() as i64)
    }

    /// The keyed MAC of a cursor's parts; `unavailable` when there is no key.
    fn mac(&self, parts: &[&str]) -> Result<Hmac<Sha256>> {
        let key = self.inner.cursor_key.as_deref().ok_or_else(|| {
            cmz_core::Error::unavailable(
                "cursor signing",
                std::io::Error::other("no cursor-signing key (the OS CSPRNG failed at startup)"),
            )
        })?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|e| cmz_core::Error::internal("cursor key").with_source(e))?;
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        Ok(mac)
    }

    pub(crate) fn sign(&self, parts: &[&str]) -> Result<String> {
        Ok(hex::encode(&self.mac(parts)?.finalize().into_bytes()[..16]))
    }

    pub(crate) fn verify(&self, parts: &[&str], signature: &str) -> bool {
        let Ok(given) = hex::decode(signature) else {
            return false;
        };
        let Ok(mac) = self.mac(parts) else {
            return false;
        };
        mac.verify_truncated_left(&given).is_ok() && given.len() == 16
    }
}

/// Read and write capacity units and requests, as DynamoDB reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CapacityReport {
    /// Read capacity units.
    pub read_units: f64,
    /// Write capacity units (transactional writes count double, GSI writes included).
    pub write_units: f64,
    /// Requests sent (retries by the SDK not counted).
    pub requests: u64,
}

impl std::ops::Sub for CapacityReport {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        Self {
            read_units: self.read_units - other.read_units,
            write_units: self.write_units - other.write_units,
            requests: self.requests - other.requests,
        }
    }
}

/// Sums `ConsumedCapacity` (in milli-units, so atomics suffice).
#[derive(Default)]
pub(crate) struct Meter {
    read_milli: AtomicU64,
    write_milli: AtomicU64,
    requests: AtomicU64,
}

impl Meter {
    pub(crate) fn record<'a>(
        &self,
        consumed: impl IntoIterator<Item = &'a ConsumedCapacity>,
        write: bool,
    ) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        for c in consumed {
            let read = c.read_capacity_units().unwrap_or(0.0);
            let written = c.write_capacity_units().unwrap_or(0.0);
            let total = c.capacity_units().unwrap_or(0.0);
            let (r, w) = if read > 0.0 || written > 0.0 {
                (read, written)
            } else if write {
                (0.0, total)
            } else {
                (total, 0.0)
            };
            self.read_milli
                .fetch_add((r * 1000.0).round() as u64, Ordering::Relaxed);
            self.write_milli
                .fetch_add((w * 1000.0).round() as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn report(&self) -> CapacityReport {
        CapacityReport {
            read_units: self.read_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            write_units: self.write_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}
