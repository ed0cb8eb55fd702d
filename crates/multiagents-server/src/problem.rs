//! Errors as RFC 9457 problem details (`application/problem+json`), each
//! saying what was wrong and, where a field of the request is at fault,
//! which.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A problem, as the API answers it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank` for the plain HTTP
    /// meaning of the status).
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time, for people.
    pub detail: String,
    /// The request field at fault (`body`, `body.steps[1].worker`,
    /// `query.wait`, `header.Idempotency-Key`), if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl Problem {
    /// A problem of `status`, titled by its kind.
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://multiagents.dev/problems/{kind}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
        }
    }

    /// Names the request field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 400: the request cannot be read.
    pub fn bad_request(field: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "The request is malformed",
            detail,
        )
        .field(field)
    }

    /// 404: no such thing.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409: it conflicts with what is there.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
    }

    /// 422: well formed, but refused.
    pub fn unprocessable(field: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "The request was refused",
            detail,
        )
        .field(field)
    }
}

impl From<multiagents::Error> for Problem {
    fn from(e: multiagents::Error) -> Self {
        use multiagents::Error;
        use multiagents::bus::BusError;
        use multiagents::store::StoreError;
        match &e {
            Error::Definition(_) => Self::unprocessable("body", e.to_string()),
            Error::UnknownWorkflow { .. } => Self::not_found(e.to_string()),
            Error::NotFound(_) => Self::not_found(e.to_string()),
            Error::Input(_) => Self::unprocessable("body", e.to_string()),
            Error::Signal { .. } => Self::conflict(e.to_string()),
            Error::Retry {
                refused: multiagents::core::saga::RetryRefused::NoSuchStep { .. },
                ..
            } => Self::unprocessable("body.from_step", e.to_string()),
            Error::Retry { .. } => Self::conflict(e.to_string()),
            Error::NoDeadLetter(_) => Self::not_found(e.to_string()),
            Error::Redrive { .. } => Self::conflict(e.to_string()),
            Error::Store(
                StoreError::Conflict { .. }
                | StoreError::DefinitionChanged { .. }
                | StoreError::AlreadyExists(_),
            ) => Self::conflict(e.to_string()),
            Error::Bus(BusError::TooLarge { .. }) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "The request is over a size limit",
                e.to_string(),
            )
            .field("body"),
            _ if e.is_transient() => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "A backend is unavailable; try again",
                e.to_string(),
            ),
            _ => {
                tracing::error!(error = %e, "request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "The service failed",
                    e.to_string(),
                )
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}
