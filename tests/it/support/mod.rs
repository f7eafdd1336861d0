//! Test harness: temp data dirs, servers bound to port 0, fixture images, cleanup by label.
pub mod api;
