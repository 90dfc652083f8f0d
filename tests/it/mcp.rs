//! The MCP endpoint's session binding: an `Mcp-Session-Id` belongs to the identity it was
//! issued to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::*;

/// A backend that issues `sess-N` to every POST without a session, like an MCP server's
/// `initialize`.
async fn issuing_backend() -> Backend {
    let n = Arc::new(AtomicUsize::new(0));
    Backend::with(move |req: http::Request<hyper::body::Incoming>| {
        let n = n.clone();
        async move {
            let mut resp = http::Response::new(full("{}"));
            if req.method() == http::Method::POST && !req.headers().contains_key("mcp-session-id") {
                let id = format!("sess-{}", n.fetch_add(1, Ordering::Relaxed));
                resp.headers_mut()
                    .insert("mcp-session-id", id.parse().unwrap());
            }
            resp
        }
    })
    .await
}

#[tokio::test]
async fn a_session_issued_to_one_identity_is_not_found_for_another() {
    let backend = issuing_backend().await;
    let proxy = Proxy::start(&backend.url(), "[mcp]\npath = \"/mcp\"\n").await;
    let (a, b) = (bearer(PROD_KEY), bearer(WEB_KEY));
    let call = async |method: &str, auth: &str, session: Option<&str>| {
        let mut h = vec![("authorization", auth)];
        if let Some(s) = session {
            h.push(("mcp-session-id", s));
        }
        let body = if method == "POST" { "{}" } else { "" };
        send(method, &proxy.url("/mcp"), &h, body).await
    };

    let r = call("POST", &a, None).await;
    assert_eq!(r.status, 200);
    let session = r.headers["mcp-session-id"].to_str().unwrap().to_string();
    assert_eq!(call("POST", &a, Some(&session)).await.status, 200);
    let seen = backend.take().len();
    assert_eq!(seen, 2);

    // Another identity presenting it: 404, as for a session the server does not know.
    let r = call("POST", &b, Some(&session)).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code().as_str()),
        (404, "session_not_found")
    );
    let r = call("GET", &b, Some(&session)).await;
    assert_eq!(r.status, 404, "the SSE stream of the session too");
    let r = call("DELETE", &b, Some(&session)).await;
    assert_eq!(r.status, 404, "and its end");
    assert_eq!(backend.count(), 0, "the backend never saw them");
    // Two copies of the header: which would the backend read?
    let r = send(
        "POST",
        &proxy.url("/mcp"),
        &[
            ("authorization", &a),
            ("mcp-session-id", &session),
            ("mcp-session-id", "sess-x"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 400);

    // A session this process never saw issued (another replica, a restart): the backend decides.
    assert_eq!(call("POST", &b, Some("issued-elsewhere")).await.status, 200);

    // Ended by its owner: no longer bound.
    let r = call("DELETE", &a, Some(&session)).await;
    assert_eq!(r.status, 200);
    assert_eq!(call("POST", &b, Some(&session)).await.status, 200);

    let lines = proxy.access_lines(9).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["outcome"] == "session_mismatch")
            .count(),
        3,
        "{lines:?}"
    );
}
