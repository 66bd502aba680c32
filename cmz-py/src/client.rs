//! `Client`: one set of services, the front door of the Python module.

// Python methods take their keyword arguments one by one.
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;

use cmz_env::Services;
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::auth::Auth;
use crate::conversations::Conversations;
use crate::runtime::{block_on, to_python};

/// A random 48-character secret from the OS CSPRNG (for clients made without one).
fn random_secret() -> PyResult<String> {
    cmz_core::random::secret_hex(24).map_err(crate::errors::to_py)
}

/// A cmz instance: the conversation and auth services over one set of stores.
///
/// `Client.from_env()` reads the legacy variables (DynamoDB when `DYNAMODB_ENDPOINT_URL`
/// or a table variable is set, else in memory; OpenAI when `OPENAI_API_KEY` /
/// `OPENAI_BASE_URL` is set, else the offline persona model). Thread-safe: share one.
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct Client {
    state: Services,
}

fn build(py: Python<'_>, env: HashMap<String, String>, use_process_env: bool) -> PyResult<Client> {
    let lookup = move |name: &str| -> Option<String> {
        env.get(name).cloned().or_else(|| {
            if use_process_env {
                std::env::var(name).ok()
            } else {
                None
            }
        })
    };
    let state = block_on(py, async move { cmz_env::services_from_env(&lookup).await })?;
    Ok(Client { state })
}

#[pymethods]
impl Client {
    /// A client configured from environment variables: the process environment, or
    /// `env` (a dict of the same names) when given.
    #[staticmethod]
    #[pyo3(signature = (env=None))]
    fn from_env(py: Python<'_>, env: Option<HashMap<String, String>>) -> PyResult<Self> {
        match env {
            Some(env) => build(py, env, false),
            None => build(py, HashMap::new(), true),
        }
    }

    /// An in-memory client (nothing persists). `dev_users` seeds the development users
    /// (`admin@cmz.org` / `admin123`, ...); without `jwt_secret` a random one is used.
    #[staticmethod]
    #[pyo3(signature = (*, jwt_secret=None, dev_users=true))]
    fn in_memory(py: Python<'_>, jwt_secret: Option<String>, dev_users: bool) -> PyResult<Self> {
        let mut env = HashMap::new();
        env.insert(
            "JWT_SECRET".to_owned(),
            match jwt_secret {
                Some(secret) => secret,
                None => random_secret()?,
            },
        );
        if dev_users {
            env.insert("CMZ_DEV_USERS".to_owned(), "embedded".to_owned());
        }
        build(py, env, false)
    }

    /// A client on DynamoDB. `tables` maps the legacy variable names
    /// (`CONVERSATION_SESSION_TABLE_NAME`, ...) to table names; `create_tables` creates
    /// missing ones (development).
    #[staticmethod]
    #[pyo3(signature = (*, endpoint_url=None, region=None, tables=None, create_tables=false, jwt_secret=None, dev_users=false))]
    fn dynamodb(
        py: Python<'_>,
        endpoint_url: Option<String>,
        region: Option<String>,
        tables: Option<HashMap<String, String>>,
        create_tables: bool,
        jwt_secret: Option<String>,
        dev_users: bool,
    ) -> PyResult<Self> {
        let mut env = tables.unwrap_or_default();
        for name in env.keys() {
            if !cmz_dynamo::TABLE_VARIABLES.contains(&name.as_str()) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown table variable {name:?}; expected one of {:?}",
                    cmz_dynamo::TABLE_VARIABLES
                )));
            }
        }
        // Make sure DynamoDB is selected even with default table names.
        env.entry("CONVERSATION_SESSION_TABLE_NAME".to_owned())
            .or_insert_with(|| "quest-dev-session".to_owned());
        if let Some(url) = endpoint_url {
            env.insert("DYNAMODB_ENDPOINT_URL".to_owned(), url);
        }
        if let Some(region) = region {
            env.insert("AWS_REGION".to_owned(), region);
        }
        if create_tables {
            env.insert("CMZ_DYNAMODB_CREATE_TABLES".to_owned(), "1".to_owned());
        }
        env.insert(
            "JWT_SECRET".to_owned(),
            match jwt_secret {
                Some(secret) => secret,
                None => random_secret()?,
            },
        );
        if dev_users {
            env.insert("CMZ_DEV_USERS".to_owned(), "embedded".to_owned());
        }
        build(py, env, false)
    }

    /// Turns, history, sessions, deletes and summaries.
    #[getter]
    fn conversations(&self) -> Conversations {
        Conversations {
            state: self.state.clone(),
        }
    }

    /// Logins, tokens and passwords.
    #[getter]
    fn auth(&self) -> Auth {
        Auth {
            state: self.state.clone(),
        }
    }

    /// Capacity DynamoDB reported for this client's calls so far (`readUnits`,
    /// `writeUnits`, `requests`), or None when the stores are in memory.
    fn capacity(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let value = match self.state.capacity() {
            Some(c) => {
                json!({"readUnits": c.read_units, "writeUnits": c.write_units, "requests": c.requests})
            }
            None => Value::Null,
        };
        Ok(to_python(py, &value)?.unbind())
    }

    /// Erases everything cmz holds about `user_id`: conversations, refresh tokens, family
    /// places, counters and the account, in every store (for the user, their parent or an
    /// administrator; audited with counts and `reason`). Calling it again finishes an
    /// interrupted erasure. Returns `{sessions, messages, account, families, refreshTokens}`.
    #[pyo3(signature = (principal, user_id, *, reason=None))]
    fn erase_user(
        &self,
        py: Python<'_>,
        principal: &crate::principal::Principal,
        user_id: String,
        reason: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let user = cmz_core::ids::UserId::new(user_id).map_err(crate::errors::to_py)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        let value = block_on(py, async move {
            let erased = state
                .erase_user(&principal, &user, reason.as_deref())
                .await?;
            crate::convert::to_json(&erased)
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// Applies every family's own retention now (what the HTTP server does every few
    /// minutes): `{families, sessions, messages}` deleted.
    fn apply_family_retention(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        let value = block_on(py, async move {
            let report = state.apply_family_retention(chrono::Utc::now()).await?;
            crate::convert::to_json(&report)
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    fn __repr__(&self) -> String {
        "cmz.Client()".to_owned()
    }
}
