//! `Auth`: logins, tokens and password hashes.

// Python methods take their keyword arguments one by one.
#![allow(clippy::too_many_arguments)]

use cmz_core::Error;
use cmz_core::access::UserRole;
use cmz_core::auth::TokenRequest;
use cmz_core::ids::{FamilyId, UserId};
use cmz_env::Services;
use pyo3::prelude::*;
use serde_json::Value;

use crate::convert::*;
use crate::principal::Principal;
use crate::runtime::{awaitable, block_on, from_python, runtime, to_python};

/// Logins, tokens and passwords.
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct Auth {
    pub(crate) state: Services,
}

#[pymethods]
impl Auth {
    /// Logs in: `{"token", "refreshToken", "expiresIn", "user": {...}}`. `client` (an IP
    /// address) gets its own failed-login limit.
    #[pyo3(signature = (email, password, *, client=None))]
    fn login(
        &self,
        py: Python<'_>,
        email: String,
        password: String,
        client: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        let value = block_on(py, async move {
            to_json(
                &state
                    .auth()
                    .login(&email, &password, client.as_deref())
                    .await?,
            )
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// `login` as an asyncio coroutine.
    #[pyo3(signature = (email, password, *, client=None))]
    fn alogin<'py>(
        &self,
        py: Python<'py>,
        email: String,
        password: String,
        client: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            to_json(
                &state
                    .auth()
                    .login(&email, &password, client.as_deref())
                    .await?,
            )
        })
    }

    /// Exchanges a refresh token (single use) for new tokens.
    fn refresh(&self, py: Python<'_>, refresh_token: String) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        sync_value(py, async move {
            to_json(&state.auth().refresh(&refresh_token).await?)
        })
    }

    /// `refresh` as an asyncio coroutine.
    fn arefresh<'py>(&self, py: Python<'py>, refresh_token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            to_json(&state.auth().refresh(&refresh_token).await?)
        })
    }

    /// Revokes an access token and its refresh chain.
    fn logout(&self, py: Python<'_>, token: String) -> PyResult<()> {
        let state = self.state.clone();
        block_on(py, async move { state.auth().logout(&token).await })
    }

    /// `logout` as an asyncio coroutine (resolves to None).
    fn alogout<'py>(&self, py: Python<'py>, token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            state.auth().logout(&token).await?;
            Ok(Value::Null)
        })
    }

    /// Verifies an access token (signature, expiry, issuer, revocation): the caller.
    fn authenticate(&self, py: Python<'_>, token: String) -> PyResult<Principal> {
        let state = self.state.clone();
        let inner = block_on(py, async move { state.auth().authenticate(&token).await })?;
        Ok(Principal { inner })
    }

    /// `authenticate` as an asyncio coroutine.
    fn aauthenticate<'py>(&self, py: Python<'py>, token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let inner = state
                .auth()
                .authenticate(&token)
                .await
                .map_err(crate::errors::to_py)?;
            Ok(Principal { inner })
        })
    }

    /// Verifies an access token and returns its claims (a dict with the legacy names).
    fn verify_token(&self, py: Python<'_>, token: String) -> PyResult<Py<PyAny>> {
        let state = self.state.clone();
        sync_value(
            py,
            async move { to_json(&state.auth().verify(&token).await?.1) },
        )
    }

    /// `verify_token` as an asyncio coroutine.
    fn averify_token<'py>(&self, py: Python<'py>, token: String) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(
            py,
            async move { to_json(&state.auth().verify(&token).await?.1) },
        )
    }

    /// Issues an access token with the legacy claims for a user described by the
    /// arguments (trusted server code; the user need not be stored). `expires_in` (seconds)
    /// replaces the configured lifetime; `claims` (a dict) adds claims, as the legacy
    /// `generate_jwt_token` copies extra user fields (those that decide validity or
    /// identity, such as `exp`, `iss`, `sub`, `role`, are ignored there).
    #[pyo3(signature = (user_id, email, role, *, family_id=None, expires_in=None, claims=None))]
    fn issue_token(
        &self,
        user_id: String,
        email: String,
        role: &str,
        family_id: Option<String>,
        expires_in: Option<i128>,
        claims: Option<Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let ttl = expires_in
            .map(|seconds| {
                u64::try_from(seconds)
                    .ok()
                    .filter(|s| (1..=10 * 365 * 86_400).contains(s))
                    .map(std::time::Duration::from_secs)
                    .ok_or_else(|| {
                        crate::errors::to_py(Error::validation(
                            "expires_in",
                            "expires_in must be 1 second to 10 years",
                        ))
                    })
            })
            .transpose()?;
        let extra = match claims {
            Some(c) if !c.is_none() => match from_python(&c)? {
                Value::Object(map) => map,
                _ => {
                    return Err(crate::errors::to_py(Error::validation(
                        "claims",
                        "claims must be a dict",
                    )));
                }
            },
            _ => serde_json::Map::new(),
        };
        let role: UserRole = role.parse().map_err(crate::errors::to_py)?;
        let mut request = TokenRequest::new(id(UserId::new, user_id)?, email, role);
        request.family_id = family_id.map(|f| id(FamilyId::new, f)).transpose()?;
        request.expires_in = ttl;
        request.claims = extra;
        let issued = self
            .state
            .auth()
            .issue_token(request)
            .map_err(crate::errors::to_py)?;
        Ok(issued.token)
    }

    /// Hashes a password with argon2id.
    fn hash_password(&self, py: Python<'_>, password: String) -> PyResult<String> {
        let state = self.state.clone();
        block_on(
            py,
            async move { state.auth().hash_password(&password).await },
        )
    }

    /// Chooses how long a family's conversations are kept (`None`: as the deployment
    /// keeps them; 0: until each conversation ends), for a parent of the family or an
    /// administrator. Returns the family.
    #[pyo3(signature = (principal, family_id, days))]
    fn set_family_retention(
        &self,
        py: Python<'_>,
        principal: &Principal,
        family_id: String,
        days: Option<u32>,
    ) -> PyResult<Py<PyAny>> {
        let family = cmz_core::ids::FamilyId::new(family_id).map_err(crate::errors::to_py)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        let value = block_on(py, async move {
            let family = state
                .auth()
                .set_family_retention(&principal, &family, days)
                .await?;
            crate::convert::to_json(&family)
        })?;
        Ok(to_python(py, &value)?.unbind())
    }

    /// Checks a password against an argon2id hash or a legacy `salt:pbkdf2` hash.
    fn verify_password(
        &self,
        py: Python<'_>,
        password: String,
        stored_hash: String,
    ) -> PyResult<bool> {
        let state = self.state.clone();
        block_on(py, async move {
            state.auth().verify_password(&password, &stored_hash).await
        })
    }
}
