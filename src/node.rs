//! Docker engines (nodes) reached through bollard: the local unix socket or mutual TLS.
