//! List answers filtered to what the caller may use (MCP.md §3): `tools/list`, `prompts/list`,
//! `resources/list` and `resources/templates/list`, in `application/json` answers and in
//! `text/event-stream` answers alike.
//!
//! An event stream is read event by event as it arrives ([`super::sse::Events`]): each event
//! whose data is a JSON-RPC response is rewritten with the list filtered; every other event
//! (notifications, the server's own requests, comments, the priming event) is passed on as
//! soon as it is whole. A JSON answer is read whole, filtered, and sent.
//!
//! Fails closed: an answer or event over `max_inspect_bytes`, a JSON answer that does not
//! parse, or an event whose data is not JSON ends the body with an error (the client sees a
//! cut answer, never an unfiltered one); an entry without a string name is removed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::Value;

use super::jsonrpc::{filter_list, ListKind};
use super::sse::Events;
use crate::authz::McpRules;
use crate::metrics::KindLabels;

/// An answer whose lists are filtered: the caller's rules. Every list a JSON-RPC response
/// carries (`tools`, `prompts`, `resources`, `resourceTemplates` of its `result`) is cut to
/// them, whatever request it answers: a list replayed on a resumed GET stream
/// (`Last-Event-ID`) is filtered like one answered on its POST.
#[derive(Debug, Clone)]
pub struct ListFilter {
    /// `None`: the caller may use everything (the answer is only marked private).
    pub rules: Option<McpRules>,
    pub max: usize,
    /// `portcullis_mcp_list_entries_hidden_total`, by list.
    pub hidden: Family<KindLabels, Counter>,
}

const LISTS: [ListKind; 4] = [
    ListKind::Tools,
    ListKind::Prompts,
    ListKind::Resources,
    ListKind::Templates,
];

/// How a filtered answer is framed.
enum Mode {
    /// The whole answer, read before anything is sent.
    Json(Vec<u8>),
    Sse(Events),
}

/// A backend's list answer on its way to the client, filtered.
pub struct Filtered<B> {
    inner: B,
    mode: Mode,
    filter: ListFilter,
    /// Rewritten bytes waiting to be sent.
    ready: VecDeque<Bytes>,
    done: bool,
}

impl ListFilter {
    /// Mark the answer private (it differs per caller: no shared cache may serve it to someone
    /// else) and, when it will be rewritten, drop its length. Returns whether the body is to
    /// be wrapped: a 2xx answer, while the caller's rules restrict the list.
    pub fn prepare(&self, status: StatusCode, headers: &mut HeaderMap) -> bool {
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        );
        if self.rules.is_none() || !status.is_success() || status == StatusCode::NO_CONTENT {
            return false;
        }
        headers.remove(header::CONTENT_LENGTH);
        true
    }

    /// Wrap the answer's body; `sse`: it is a `text/event-stream`.
    pub fn wrap<B>(self, inner: B, sse: bool) -> Filtered<B> {
        Filtered {
            inner,
            mode: if sse {
                Mode::Sse(Events::new(self.max))
            } else {
                Mode::Json(Vec::new())
            },
            filter: self,
            ready: VecDeque::new(),
            done: false,
        }
    }

    /// Filter one JSON-RPC message: a response has its list cut to the caller's rules; any
    /// other message is left alone. `None` when nothing changed.
    fn rewrite(&self, message: &mut Value) -> Option<()> {
        let rules = self.rules.as_ref()?;
        message.get("result")?;
        let mut changed = false;
        for list in LISTS {
            let kind = list.kind();
            if rules.unrestricted(kind) {
                continue;
            }
            let removed = filter_list(message, list, |name| rules.permits(kind, name).is_some());
            if removed > 0 {
                changed = true;
                self.hidden
                    .get_or_create(&KindLabels {
                        kind: list.fields().0,
                    })
                    .inc_by(removed as u64);
            }
        }
        changed.then_some(())
    }
}

/// Why a filtered answer was cut.
#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refused {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Filtered<B> {
    /// Bytes that arrived: for JSON, kept until the end; for SSE, the events they complete.
    fn take(&mut self, data: &[u8]) -> Result<(), BoxError> {
        match &mut self.mode {
            Mode::Json(buf) => {
                if buf.len() + data.len() > self.filter.max {
                    return Err(Box::new(Refused("list answer over max_inspect_bytes")));
                }
                buf.extend_from_slice(data);
            }
            Mode::Sse(events) => {
                let complete = events
                    .push(data)
                    .map_err(|_| Box::new(Refused("list event over max_inspect_bytes")))?;
                for event in complete {
                    let text = event.data.as_deref().unwrap_or("");
                    if text.trim().is_empty() {
                        self.ready.push_back(Bytes::from(event.raw));
                        continue;
                    }
                    let mut message: Value = serde_json::from_str(text)
                        .map_err(|_| Box::new(Refused("list event is not JSON")))?;
                    let out = match self.filter.rewrite(&mut message) {
                        Some(()) => event.with_data(&message.to_string()),
                        None => event.raw,
                    };
                    self.ready.push_back(Bytes::from(out));
                }
            }
        }
        Ok(())
    }

    /// The end of the backend's body: a JSON answer is filtered and sent now.
    fn end(&mut self) -> Result<(), BoxError> {
        if let Mode::Json(buf) = &mut self.mode {
            let mut message: Value = serde_json::from_slice(buf)
                .map_err(|_| Box::new(Refused("list answer is not JSON")))?;
            let out = match self.filter.rewrite(&mut message) {
                Some(()) => Bytes::from(message.to_string()),
                None => Bytes::from(std::mem::take(buf)),
            };
            self.ready.push_back(out);
        }
        Ok(())
    }
}

impl<B> Body for Filtered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        if let Err(e) = this.take(data) {
                            this.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                    // Trailers of a list answer are dropped: nothing in MCP sends them.
                }
                Poll::Ready(None) => {
                    this.done = true;
                    if let Err(e) = this.end() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.ready.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::McpKind;
    use http_body_util::{BodyExt, StreamBody};

    fn filter() -> ListFilter {
        ListFilter {
            rules: Some(McpRules::parse_field(McpKind::Tool, &["get_*"]).unwrap()),
            max: 4096,
            hidden: Family::default(),
        }
    }

    async fn run(chunks: Vec<&'static [u8]>, sse: bool) -> Result<String, String> {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c)))),
        );
        let body = filter().wrap(StreamBody::new(stream), sse);
        match body.collect().await {
            Ok(c) => Ok(String::from_utf8(c.to_bytes().to_vec()).unwrap()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn an_event_stream_answer_is_filtered_event_by_event_whatever_the_chunking() {
        let out = run(
            vec![
                b"id: 1\ndata: \n\n: keep-alive\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\nevent: mess",
                b"age\ndata: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"get_time\"},{\"name\":\"delete_all\"}],\"nextCursor\":\"n\"}}\nid: 9\n\n",
            ],
            true,
        )
        .await
        .unwrap();
        assert!(out.starts_with("id: 1\ndata: \n\n: keep-alive\n\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\""), "{out}");
        assert!(!out.contains("delete_all"), "{out}");
        assert!(out.contains("get_time") && out.contains("\"nextCursor\":\"n\""));
        assert!(out.ends_with("id: 9\n\n"), "other fields kept: {out}");
    }

    #[tokio::test]
    async fn a_json_answer_is_filtered_whole_and_junk_is_refused() {
        let out = run(
            vec![
                b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"delete_all\"},",
                b"{\"name\":\"get_x\"}]}}",
            ],
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            out,
            "{\"id\":1,\"jsonrpc\":\"2.0\",\"result\":{\"tools\":[{\"name\":\"get_x\"}]}}"
        );
        assert!(run(vec![b"{\"tools\": ["], false).await.is_err());
        assert!(run(vec![b"data: {not json\n\n"], true).await.is_err());
        let big: &'static [u8] = Box::leak(vec![b'x'; 5000].into_boxed_slice());
        assert!(run(vec![b"data: ", big], true).await.is_err());
    }
}
