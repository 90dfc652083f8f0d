//! Rate limits, per-address connection limits, allow_cidrs and trusted_proxies, through a
//! running proxy. Clients use other loopback addresses (127.0.0.2, 127.0.0.3) as other hosts.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

async fn get_from(ip: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    send_with(&client_from(ip), "GET", url, headers, "").await
}

/// A TCP connection to `to` from the loopback address `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the proxy answers a request on this connection (false: it closed it unanswered).
async fn answered(stream: &mut TcpStream) -> bool {
    let request = format!("GET /x HTTP/1.1\r\nHost: t\r\nX-API-Key: {PROD_KEY}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(n)) => n > 0 && buf.starts_with(b"HTTP/1.1"),
        _ => false,
    }
}

fn keys_with_limits() -> String {
    format!(
        "{}\n[[keys]]\nname = \"slow\"\napi_key = \"mas_SlowKey00000000000000000000000000000000000000\"\n\
         requests_per_second = 1\nburst = 1\n",
        keys_file()
    )
}

const SLOW_KEY: &str = "mas_SlowKey00000000000000000000000000000000000000";

async fn limited_proxy(backend: &Backend, rate: &str, server: &str) -> Proxy {
    Proxy::start_with_keys(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n\
             [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n[rate_limit]\n{rate}\n",
            backend.url()
        ),
        &keys_with_limits(),
    )
    .await
}

#[tokio::test]
async fn a_burst_is_served_then_429_with_retry_after_and_ratelimit_headers() {
    let backend = Backend::ok().await;
    let proxy = limited_proxy(&backend, "requests_per_second = 1\nburst = 3", "").await;
    let key = [("x-api-key", PROD_KEY)];
    for remaining in [2, 1, 0] {
        let r = get(&proxy.url("/api"), &key).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["ratelimit-policy"], "\"default\";q=3;w=3");
        let state = r.headers["ratelimit"].to_str().unwrap().to_string();
        assert!(
            state.starts_with(&format!("\"default\";r={remaining};t=")),
            "{state}"
        );
    }
    let r = get(&proxy.url("/api"), &key).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "rate_limited");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.headers["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"default\";r=0;"));
    assert_eq!(
        backend.count(),
        3,
        "the limited request never reached the backend"
    );
    // Another key has its own budget.
    assert_eq!(
        get(&proxy.url("/api"), &[("x-api-key", WEB_KEY)])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_key_override_applies_to_that_key_only() {
    let backend = Backend::ok().await;
    let proxy = limited_proxy(&backend, "requests_per_second = 100\nburst = 100", "").await;
    let slow = [("x-api-key", SLOW_KEY)];
    assert_eq!(get(&proxy.url("/a"), &slow).await.status, 200);
    let r = get(&proxy.url("/a"), &slow).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["ratelimit-policy"], "\"default\";q=1;w=1");
    for _ in 0..5 {
        assert_eq!(
            get(&proxy.url("/a"), &[("x-api-key", PROD_KEY)])
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn one_key_from_two_addresses_shares_one_budget() {
    let backend = Backend::ok().await;
    let proxy = limited_proxy(&backend, "requests_per_second = 1\nburst = 2", "").await;
    let key = [("x-api-key", PROD_KEY)];
    assert_eq!(
        get_from("127.0.0.2", &proxy.url("/a"), &key).await.status,
        200
    );
    assert_eq!(
        get_from("127.0.0.3", &proxy.url("/a"), &key).await.status,
        200
    );
    assert_eq!(
        get_from("127.0.0.2", &proxy.url("/a"), &key).await.status,
        429
    );
    assert_eq!(
        get_from("127.0.0.3", &proxy.url("/a"), &key).await.status,
        429
    );
}

#[tokio::test]
async fn anonymous_clients_are_limited_per_address() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"{}\"\n[auth]\nanonymous = true\n\
         [rate_limit]\nrequests_per_second = 1\nburst = 2\n",
        backend.url()
    ))
    .await;
    let url = proxy.url("/public");
    for _ in 0..2 {
        assert_eq!(get_from("127.0.0.2", &url, &[]).await.status, 200);
    }
    assert_eq!(get_from("127.0.0.2", &url, &[]).await.status, 429);
    assert_eq!(get_from("127.0.0.3", &url, &[]).await.status, 200);
}

#[tokio::test]
async fn max_connections_per_ip_refuses_the_next_connection_until_one_closes() {
    let backend = Backend::ok().await;
    let proxy = Proxy::with_server(&backend.url(), "max_connections_per_ip = 2").await;
    let mut first = tcp_from("127.0.0.2", proxy.addr).await;
    let mut second = tcp_from("127.0.0.2", proxy.addr).await;
    assert!(answered(&mut first).await);
    assert!(answered(&mut second).await);
    let mut third = tcp_from("127.0.0.2", proxy.addr).await;
    assert!(!answered(&mut third).await, "a third connection was served");
    // Another address is not affected.
    let mut other = tcp_from("127.0.0.3", proxy.addr).await;
    assert!(answered(&mut other).await);

    drop(first);
    eventually(Duration::from_secs(10), async || {
        let mut again = tcp_from("127.0.0.2", proxy.addr).await;
        answered(&mut again).await.then_some(())
    })
    .await
    .expect("the closed connection's place was never freed");
}

#[tokio::test]
async fn allow_cidrs_refuses_clients_outside_the_list() {
    let backend = Backend::ok().await;
    let proxy =
        Proxy::with_server(&backend.url(), "allow_cidrs = [\"127.0.0.2/32\", \"::1\"]").await;
    let mut inside = tcp_from("127.0.0.2", proxy.addr).await;
    assert!(answered(&mut inside).await);
    let mut outside = tcp_from("127.0.0.3", proxy.addr).await;
    assert!(
        !answered(&mut outside).await,
        "a client outside allow_cidrs was served"
    );
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let backend = Backend::ok().await;
    let spoof = [("x-api-key", PROD_KEY), ("x-forwarded-for", "203.0.113.5")];

    // Untrusted peer: the header changes nothing.
    let proxy = Proxy::start(&backend.url(), "").await;
    assert_eq!(get(&proxy.url("/a"), &spoof).await.status, 200);
    let seen = backend.take();
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen[0].headers["x-real-ip"], "127.0.0.1");
    assert_eq!(proxy.access_lines(1).await[0]["client"], "127.0.0.1");

    // Trusted peer: the client it names is the client; the chain is kept and extended.
    let proxy = Proxy::with_server(
        &backend.url(),
        "trusted_proxies = [\"127.0.0.1/32\"]\nallow_cidrs = [\"203.0.113.0/24\", \"127.0.0.0/8\"]",
    )
    .await;
    assert_eq!(get(&proxy.url("/a"), &spoof).await.status, 200);
    let seen = backend.take();
    assert_eq!(seen[0].headers["x-forwarded-for"], "203.0.113.5, 127.0.0.1");
    assert_eq!(seen[0].headers["x-real-ip"], "203.0.113.5");
    assert_eq!(proxy.access_lines(1).await[0]["client"], "203.0.113.5");

    // allow_cidrs applies to the forwarded client: 403 forbidden_network.
    let r = get(
        &proxy.url("/a"),
        &[("x-api-key", PROD_KEY), ("x-forwarded-for", "198.51.100.1")],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "forbidden_network");
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn anonymous_limits_follow_the_forwarded_client_behind_a_trusted_proxy() {
    let backend = Backend::ok().await;
    let proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         trusted_proxies = [\"127.0.0.1\"]\n\
         [upstream]\nurl = \"{}\"\n[auth]\nanonymous = true\n\
         [rate_limit]\nrequests_per_second = 1\nburst = 1\n",
        backend.url()
    ))
    .await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(
        get(&proxy.url("/p"), &from("203.0.113.1")).await.status,
        200
    );
    assert_eq!(
        get(&proxy.url("/p"), &from("203.0.113.1")).await.status,
        429
    );
    assert_eq!(
        get(&proxy.url("/p"), &from("203.0.113.2")).await.status,
        200
    );
}
