#![doc = include_str!("../README.md")]

mod auth;
mod care;
mod client;
mod conversations;
mod convert;
mod errors;
mod principal;
mod runtime;
mod stream;

use pyo3::prelude::*;

/// The native module behind `import cmz`.
#[pymodule]
fn _cmz(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<client::Client>()?;
    m.add_class::<conversations::Conversations>()?;
    m.add_class::<auth::Auth>()?;
    m.add_class::<principal::Principal>()?;
    m.add_class::<stream::TurnStream>()?;
    errors::register(m)?;
    Ok(())
}
