//! The built-in reverse proxy: routes HTTP(S) by host name to healthy instances.
