//! portcullis: an authenticating reverse-proxy sidecar.
//!
//! The library holds everything; `main.rs` only parses the command line. Tests and the `demo`
//! command drive a [`Server`] in-process.

pub mod access_log;
pub mod auth;
pub mod authz;
pub mod ban;
pub mod config;
pub mod conn;
pub mod cpu;
pub mod demo;
pub mod diag;
pub mod error;
pub mod forward_auth;
pub mod framing;
pub mod headers;
pub mod mcp;
pub mod metrics;
pub mod netpolicy;
pub mod path;
pub mod proxy;
pub mod ratelimit;
pub mod redis;
pub mod reload;
#[cfg(unix)]
pub mod sdnotify;
pub mod server;
pub mod streams;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::Server;
