//! An SSE backend fed by the test, and a client that reads a stream chunk by chunk.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::*;

pub type Sender =
    tokio::sync::mpsc::Sender<Result<Bytes, Box<dyn std::error::Error + Send + Sync>>>;

/// A backend answering every request with an SSE stream fed by the test.
pub struct SseBackend {
    pub backend: Backend,
    pub senders: Arc<Mutex<Vec<Sender>>>,
}

impl SseBackend {
    pub async fn start() -> SseBackend {
        let senders: Arc<Mutex<Vec<Sender>>> = Default::default();
        let s = senders.clone();
        let backend = Backend::with(move |_req: Request<Incoming>| {
            let s = s.clone();
            async move {
                let (tx, body) = channel_body();
                s.lock().unwrap().push(tx);
                let mut resp = Response::new(body);
                let h = resp.headers_mut();
                h.insert("content-type", "text/event-stream".parse().unwrap());
                h.insert("cache-control", "no-cache".parse().unwrap());
                h.insert("mcp-session-id", "session-1234".parse().unwrap());
                resp
            }
        })
        .await;
        SseBackend { backend, senders }
    }

    /// The sender of the n-th stream, once its request has arrived.
    pub async fn sender(&self, n: usize) -> Sender {
        let senders = self.senders.clone();
        eventually(Duration::from_secs(10), async || {
            senders.lock().unwrap().get(n).cloned()
        })
        .await
        .expect("the stream request reached the backend")
    }
}

pub async fn event(tx: &Sender, text: &str) {
    tx.send(Ok(Bytes::from(format!("data: {text}\n\n"))))
        .await
        .expect("the stream is open");
}

/// The next data chunk of a streaming response, within 10 s.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a frame within 10 s")?;
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

pub async fn open_stream(proxy: &Proxy, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut req = Request::get(proxy.url("/mcp"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client()
        .request(req.body(full("")).unwrap())
        .await
        .expect("response headers")
}
