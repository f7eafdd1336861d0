//! The one integration-test binary: real `escale serve`, real Docker engine.

mod node;
mod support;

mod api;
