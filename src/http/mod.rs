//! What every HTTP surface of escale shares (the API, git smart HTTP, push webhooks, the
//! dashboard): the one error type rendered as `application/problem+json`, and the request
//! extractors (the authenticated caller, JSON bodies, paths and queries whose rejections say
//! what to fix). Depends on the registry and validation only, so the surfaces depend on it and
//! never on each other.

mod extract;
pub mod int;
mod problem;

pub use extract::{Auth, Json, Path, Query};
pub use problem::{ApiError, Problem};
