#![doc = include_str!("../README.md")]

mod client;
mod errors;
mod runtime;

use pyo3::prelude::*;

/// The native module behind `import cmz`.
#[pymodule]
fn _cmz(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<client::Client>()?;
    m.add_class::<client::Conversations>()?;
    m.add_class::<client::Auth>()?;
    m.add_class::<client::Principal>()?;
    m.add_class::<client::TurnStream>()?;
    errors::register(m)?;
    Ok(())
}
