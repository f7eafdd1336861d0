//! The one integration-test binary: real `escale serve`, real Docker engine.

mod support;

mod api;
mod certs;
mod cli;
mod gitpush;
mod isolation;
mod manifest;
mod node;
mod proxy;
mod scheduler;
mod webhooks;
mod zero_downtime;
