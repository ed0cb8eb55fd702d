//! Extractors whose refusals are problems: a query string or path that
//! does not parse gets a problem+json 400 naming the parameter, like every
//! other error of the API.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::Problem;

/// The query string as `T`.
pub(crate) struct Query<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => {
                // "Failed to deserialize query string: version: invalid digit …"
                let text = e.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text)
                    .to_string();
                let field = match detail.split_once(": ") {
                    Some((name, _)) if !name.contains(' ') => format!("query.{name}"),
                    _ => "query".to_string(),
                };
                Err(Problem::bad_request(&field, detail))
            }
        }
    }
}

/// The path parameters as `T`.
pub(crate) struct Path<T>(pub(crate) T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(Problem::bad_request("path", e.body_text())),
        }
    }
}

/// The body as text: one that is not UTF-8, or over the size limit, is a
/// problem naming the body.
pub(crate) struct Text(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Text {
    type Rejection = Problem;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Problem> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(bytes) => match String::from_utf8(bytes.to_vec()) {
                Ok(text) => Ok(Text(text)),
                Err(e) => Err(Problem::bad_request(
                    "body",
                    format!("the body is not UTF-8 text: {e}"),
                )),
            },
            Err(e) => Err(Problem::new(
                e.status(),
                "bad-body",
                "The body cannot be read",
                e.body_text(),
            )
            .field("body")),
        }
    }
}
