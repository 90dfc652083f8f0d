//! Integration tests: a real backend and a real proxy on loopback, one test crate.

mod adversarial;
mod auth_api_key;
mod cli;
mod connections;
mod docs;
mod forward_auth;
mod forwarding;
mod hardening;
mod htpasswd;
mod instances;
mod layout;
mod limits;
mod mcp;
mod mcp_tools;
mod oauth;
mod ops;
mod paths;
mod redis;
mod reload;
mod shutdown;
mod soak;
mod streams;
mod support;
mod tls;
mod upstream_conn;
mod websocket;
