//! One place that turns DynamoDB SDK errors into cmz errors.

use std::fmt::Debug;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use cmz_core::Error;

/// Maps an SDK error from `op` on `table` to a cmz error, keeping the SDK error as source.
///
/// | what DynamoDB said | code |
/// | --- | --- |
/// | `ConditionalCheckFailedException`, `TransactionConflictException` | `conflict` |
/// | `ValidationException` about item size | `validation_error` |
/// | `ResourceNotFoundException` | `unavailable`, naming the table |
/// | throttling, 5xx, connection failures (after the SDK's retries) | `unavailable` |
/// | other `ValidationException`s (a bug in a request cmz built) | `internal_error` |
pub(crate) fn map_sdk<E, R>(op: &'static str, table: &str, err: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    tracing::debug!(op, table, code, message, "dynamodb call failed");
    let err = match err {
        SdkError::ServiceError(context) => return map_service(op, table, context.into_err()),
        other => other,
    };
    let what = match &err {
        SdkError::TimeoutError(_) => "did not answer in time",
        SdkError::DispatchFailure(_) => "could not be reached",
        SdkError::ResponseError(_) => "sent an unreadable response",
        _ => "failed",
    };
    Error::unavailable(format!("dynamodb {op} on {table} {what}"), err)
}

/// Maps an error DynamoDB answered with (see [`map_sdk`]).
pub(crate) fn map_service<E>(op: &'static str, table: &str, err: E) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    {
        match code.as_str() {
            "ConditionalCheckFailedException" | "TransactionConflictException" => {
                return Error::conflict(format!(
                    "dynamodb {op} on {table}: a concurrent change won ({code})"
                ));
            }
            "ValidationException" if is_size_error(&message) => {
                return Error::validation(
                    "message",
                    format!("the item is larger than DynamoDB's 400 KB limit ({message})"),
                );
            }
            "ValidationException" => {
                return Error::internal(format!(
                    "dynamodb {op} on {table} rejected the request: {message}"
                ))
                .with_source(err);
            }
            "ResourceNotFoundException" => {
                return Error::unavailable(
                    format!("dynamodb {op}: table {table} does not exist"),
                    err,
                );
            }
            _ => {}
        }
    }
    Error::unavailable(format!("dynamodb {op} on {table} failed ({code})"), err)
}

pub(crate) fn is_size_error(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("item size") || message.contains("maximum allowed size")
}
