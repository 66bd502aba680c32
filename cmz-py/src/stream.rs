//! `TurnStream`: a streamed turn, iterated synchronously or with asyncio.

use std::sync::Arc;

use cmz_core::Result;
use cmz_core::service::TurnEvent;
use futures::StreamExt as _;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::convert::*;
use crate::runtime::{block_on, runtime, to_python};

/// A streamed turn (see `Conversations.stream_turn`).
#[pyclass(frozen, module = "cmz._cmz")]
pub(crate) struct TurnStream {
    pub(crate) inner: Arc<Mutex<Option<cmz_core::service::TurnStream>>>,
    /// The session, new or continued.
    #[pyo3(get)]
    pub(crate) session_id: String,
    /// Whether this turn created the session.
    #[pyo3(get)]
    pub(crate) session_created: bool,
}

pub(crate) async fn next_event(
    inner: Arc<Mutex<Option<cmz_core::service::TurnStream>>>,
) -> Result<Option<Value>> {
    let mut guard = inner.lock().await;
    let Some(stream) = guard.as_mut() else {
        return Ok(None);
    };
    match stream.next().await {
        None => {
            *guard = None;
            Ok(None)
        }
        Some(Err(e)) => {
            *guard = None;
            Err(e)
        }
        Some(Ok(TurnEvent::Delta(text))) => Ok(Some(json!({"type": "delta", "content": text}))),
        Some(Ok(TurnEvent::Complete(reply))) => {
            *guard = None;
            let mut value = reply_json(&reply)?;
            value["type"] = json!("complete");
            Ok(Some(value))
        }
    }
}

#[pymethods]
impl TurnStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let inner = self.inner.clone();
        match block_on(py, next_event(inner))? {
            Some(value) => Ok(Some(to_python(py, &value)?.unbind())),
            None => Ok(None),
        }
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match next_event(inner).await.map_err(crate::errors::to_py)? {
                Some(value) => Python::attach(|py| to_python(py, &value).map(Bound::unbind)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }

    /// Stops the turn: the model call is cancelled and the partial reply is stored,
    /// marked interrupted.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        block_on(py, async move {
            inner.lock().await.take();
            Ok(())
        })
    }
}
