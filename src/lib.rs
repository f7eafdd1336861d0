//! escale: a self-hosted PaaS appliance in one binary.
//!
//! `escale serve` runs the registry (SQLite), the API, the reconciler that places and heals
//! containers on Docker engines, and the reverse proxy. The same binary is the CLI.
//! See `ARCHITECTURE.md` for the bird's-eye view, the code map and the invariants.

pub mod node;
pub mod proxy;
pub mod routing;
pub mod scheduler;
pub mod auth;
pub mod config;
pub mod registry;
pub mod secrets;
pub mod validate;
pub mod api;
pub mod server;
pub mod cli;
