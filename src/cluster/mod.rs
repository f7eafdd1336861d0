//! The cluster (issue #16): what escale needs to run apps on more than one Docker engine.
//!
//! - [`pki`]: the installation's own certificate authority, node server certificates and
//!   bundles, escale's client certificate, and the verification (with reasons) of what a node
//!   presents. Nodes are plain Docker engines with `--tlsverify` on tcp 2376 trusting only
//!   this CA; escale trusts only this CA for them.
//!
//! Membership (ready/suspect/down) and image transfer come next; the scheduler does not use
//! this module yet.

pub mod pki;
