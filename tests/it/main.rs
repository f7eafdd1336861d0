//! The one integration-test binary: real `escale serve`, real Docker engine.

mod support;

mod api;
mod backup;
mod backup_s3;
mod certs;
mod cli;
mod cluster;
mod dashboard;
mod deploys;
mod doctor;
mod exhaustion;
mod gitpush;
mod image;
mod install;
mod isolation;
mod manifest;
mod multinode;
mod network;
mod node;
mod proxy;
mod ps;
mod scheduler;
mod smuggling;
mod startup;
mod upgrade;
mod upkeep;
mod webhooks;
mod zero_downtime;
