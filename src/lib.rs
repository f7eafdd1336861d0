//! escale: a self-hosted PaaS appliance in one binary.
//!
//! `escale serve` runs the registry (SQLite), the API, the reconciler that places and heals
//! containers on Docker engines, and the reverse proxy. The same binary is the CLI.
//! See `ARCHITECTURE.md` for the bird's-eye view, the code map and the invariants.

pub mod api;
pub mod auth;
pub mod certs;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod events;
pub mod git;
pub mod images;
pub mod listen;
pub mod manifest;
pub mod node;
pub mod proxy;
pub mod registry;
pub mod routing;
pub mod runtime;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod validate;
pub mod webhooks;
