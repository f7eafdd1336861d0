//! Test harness: temp data dirs, servers bound to port 0, fixture images, cleanup by label.
pub mod api;
pub mod base;

pub mod docker;
pub mod fixture;
pub mod load;
pub mod nodes;
pub mod s3;
pub mod server;
pub mod tar;

#[allow(unused_imports)]
pub use docker::{
    docker_cli, http_get, http_get_ready, local_node, sweep_leftovers, wait_for, TestInstallation,
};
#[allow(unused_imports)]
pub use fixture::fixture_image;
