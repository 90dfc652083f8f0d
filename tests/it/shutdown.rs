//! Graceful shutdown: stop accepting, finish what is in flight within shutdown_grace.

use std::time::Duration;

use http::Response;

use crate::support::*;

#[tokio::test]
async fn shutdown_finishes_an_in_flight_request_and_then_refuses_new_connections() {
    let backend = Backend::with(|_req| async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        Response::new(full("finished"))
    })
    .await;
    let mut proxy = Proxy::start(&backend.url(), "").await;
    let url = proxy.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url, &[("x-api-key", PROD_KEY)]).await });
    // Wait until the backend has the request, so it is truly in flight.
    eventually(Duration::from_secs(5), async || {
        (backend.count() == 1).then_some(())
    })
    .await
    .expect("the request reached the backend");
    let server = proxy.server.take().unwrap();
    let stopped = tokio::spawn(server.shutdown());
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "finished");
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn shutdown_grace_bounds_how_long_a_stuck_request_is_waited_for() {
    let backend = Backend::with(|_req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Response::new(full("never"))
    })
    .await;
    let mut proxy = Proxy::start_with(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"300ms\"\n[upstream]\nurl = \"{}\"\n",
        backend.url()
    ))
    .await;
    let url = proxy.url("/stuck");
    let _in_flight = tokio::spawn(async move { get(&url, &[("x-api-key", PROD_KEY)]).await });
    eventually(Duration::from_secs(5), async || {
        (backend.count() == 1).then_some(())
    })
    .await
    .expect("the request reached the backend");
    let server = proxy.server.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown gives up on the stuck request after the grace period");
}
