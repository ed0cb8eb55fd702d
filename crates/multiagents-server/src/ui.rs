//! The dashboard, at `/ui`: a page and its script and style, embedded in
//! the binary (written without a build step; Mermaid is vendored), so that
//! nothing is fetched from anywhere but this service. It works over the
//! same API as everyone else, with the caller's key.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::Service;

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const APP_CSS: &str = include_str!("../ui/app.css");
const MERMAID_JS: &str = include_str!("../ui/vendor/mermaid.min.js");

fn asset(body: &'static str, media: &'static str, cache: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(media)),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ],
        body,
    )
        .into_response()
}

/// The dashboard's routes: `/ui` (the page; the app routes within it after
/// `#`), `/ui/app.js`, `/ui/app.css` and `/ui/vendor/mermaid.min.js`.
pub(crate) fn routes() -> Router<Service> {
    // The page and the app change with the binary; Mermaid only with its
    // version, which is in its path's directory.
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8", "no-cache") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8", "no-cache") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8", "no-cache") }),
        )
        .route(
            "/ui/vendor/mermaid.min.js",
            get(|| async {
                asset(
                    MERMAID_JS,
                    "text/javascript; charset=utf-8",
                    "public, max-age=86400",
                )
            }),
        )
}

/// Whether `path` is one of the dashboard's (public: the page holds no
/// data; every call it makes needs a key when the service requires one).
pub(crate) fn is_ui(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}
