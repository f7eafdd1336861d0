//! The one integration-test binary: real `escale serve`, real Docker engine.

mod support;

mod api;
mod cli;
mod gitpush;
mod node;
mod proxy;
mod scheduler;
