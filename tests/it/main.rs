//! The one integration-test binary: real `escale serve`, real Docker engine.

mod support;

mod api;
mod certs;
mod cli;
mod cluster;
mod deploys;
mod exhaustion;
mod gitpush;
mod image;
mod isolation;
mod manifest;
mod multinode;
mod network;
mod node;
mod proxy;
mod scheduler;
mod smuggling;
mod upkeep;
mod webhooks;
mod zero_downtime;
