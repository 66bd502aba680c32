//! `TurnStream`: a streamed turn, iterated synchronously or with asyncio.

use std::sync::Arc;

use cmz_core::Result;
use cmz_core::service::{ResumableStream, StreamItem, TurnEvent};
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
    pub(crate) inner: Arc<Mutex<Option<ResumableStream>>>,
    /// The session, new or continued.
    #[pyo3(get)]
    pub(crate) session_id: String,
    /// Whether this turn created the session.
    #[pyo3(get)]
    pub(crate) session_created: bool,
    /// The stream's id, for `Conversations.resume_stream` (and what the HTTP API sends as
    /// `streamId`).
    #[pyo3(get)]
    pub(crate) stream_id: String,
    pub(crate) services: cmz_env::Services,
    pub(crate) principal: cmz_core::access::Principal,
}

impl TurnStream {
    pub(crate) fn new(
        stream: ResumableStream,
        services: cmz_env::Services,
        principal: cmz_core::access::Principal,
    ) -> Self {
        Self {
            session_id: stream.session_id.to_string(),
            session_created: stream.session_created,
            stream_id: stream.stream_id.clone(),
            inner: Arc::new(Mutex::new(Some(stream))),
            services,
            principal,
        }
    }
}

pub(crate) async fn next_event(
    inner: Arc<Mutex<Option<ResumableStream>>>,
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
        Some(Ok(StreamItem {
            number,
            event: TurnEvent::Delta(text),
        })) => Ok(Some(
            json!({"type": "delta", "content": text, "id": number}),
        )),
        Some(Ok(StreamItem {
            number,
            event: TurnEvent::Complete(reply),
        })) => {
            *guard = None;
            let mut value = reply_json(&reply)?;
            value["type"] = json!("complete");
            value["id"] = json!(number);
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

    /// Stops the turn at once: the model call is cancelled and the partial reply is
    /// stored, marked interrupted. (Abandoning the stream instead leaves the turn running
    /// for the resume grace period, `CMZ_STREAM_RESUME_GRACE_MS`, in case it is resumed.)
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        let (services, principal, id) = (
            self.services.clone(),
            self.principal.clone(),
            self.stream_id.clone(),
        );
        block_on(py, async move {
            if inner.lock().await.take().is_some() {
                // Kept by the service until the grace period ends; gone after is fine.
                let _ = services.conversations().stop_stream(&principal, &id).await;
            }
            Ok(())
        })
    }
}
