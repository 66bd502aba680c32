//! `Principal`: who is asking, as the services see it.

use cmz_core::access::UserRole;
use cmz_core::ids::{FamilyId, UserId};
use pyo3::prelude::*;

/// Who is asking: made by `Auth.authenticate(token)`, or by trusted server code with
/// `Principal(user_id, role)`.
#[pyclass(frozen, module = "cmz._cmz")]
#[derive(Clone)]
pub(crate) struct Principal {
    pub(crate) inner: cmz_core::access::Principal,
}

#[pymethods]
impl Principal {
    #[new]
    #[pyo3(signature = (user_id, role="user", family_id=None))]
    fn new(user_id: String, role: &str, family_id: Option<String>) -> PyResult<Self> {
        let user_id = UserId::new(user_id).map_err(crate::errors::to_py)?;
        let role: UserRole = role.parse().map_err(crate::errors::to_py)?;
        let family_id = family_id
            .map(FamilyId::new)
            .transpose()
            .map_err(crate::errors::to_py)?;
        Ok(Self {
            inner: cmz_core::access::Principal {
                user_id,
                role,
                family_id,
            },
        })
    }

    /// The user id.
    #[getter]
    fn user_id(&self) -> &str {
        self.inner.user_id.as_str()
    }

    /// The role (`admin`, `parent`, `student`, ...).
    #[getter]
    fn role(&self) -> &'static str {
        self.inner.role.as_str()
    }

    /// The family id, if any.
    #[getter]
    fn family_id(&self) -> Option<&str> {
        self.inner.family_id.as_ref().map(|f| f.as_str())
    }

    fn __repr__(&self) -> String {
        format!(
            "cmz.Principal({:?}, role={:?})",
            self.inner.user_id.as_str(),
            self.inner.role.as_str()
        )
    }
}
