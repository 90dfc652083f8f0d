//! The client's request body on its way to the backend, and how it is kept for a second
//! instance when the first could not be reached.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;

/// The client's request body on its way to the backend: limited to `max_body_bytes`, and with
/// the client's own failures (bad chunking, a reset) told apart from the backend's.
/// Its trailers (HTTP/2, chunked HTTP/1.1) lose what request headers lose: a trailer is a
/// header that arrives late, and a backend may merge it with the others.
///
/// A body sent toward one of several instances is [`ClientBody::replayable`]: it stays in a
/// shared slot until the connection to the backend first asks for it, so a request whose
/// connection failed before any byte was written can be sent again, whole, elsewhere.
pub struct ClientBody {
    body: Option<Source>,
    /// Where the body waits until it is first polled, when it may be sent again.
    slot: Option<Arc<Mutex<Option<Source>>>>,
    /// What the body said of itself before it was put in the slot.
    hint: SizeHint,
    ended: bool,
    /// Names no trailer may carry toward the backend.
    trailer_strip: Arc<crate::headers::NameSet>,
}

enum Source {
    /// Streamed from the client as it arrives.
    Stream(Limited<Incoming>),
    /// Read whole and judged before it is sent (MCP tool rules): exactly these bytes go.
    Whole(Option<Bytes>),
}

impl Source {
    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Whole(w) => SizeHint::with_exact(w.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Stream(body) => body.size_hint(),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Whole(w) => w.is_none(),
            Source::Stream(body) => body.is_end_stream(),
        }
    }
}

/// A body kept for another attempt: hands out the body again as long as no attempt has
/// started to read it. An empty body is simply made again (no slot).
pub struct Replay {
    slot: Option<Arc<Mutex<Option<Source>>>>,
    hint: SizeHint,
    ended: bool,
    trailer_strip: Arc<crate::headers::NameSet>,
}

impl Replay {
    /// The body again, if nothing of it has been read; `None` once an attempt started on it.
    pub fn again(&self) -> Option<ClientBody> {
        let Some(slot) = &self.slot else {
            return Some(ClientBody::whole(Bytes::new()));
        };
        let present = slot.lock().map(|s| s.is_some()).unwrap_or(false);
        present.then(|| ClientBody {
            body: None,
            slot: Some(slot.clone()),
            hint: self.hint,
            ended: self.ended,
            trailer_strip: self.trailer_strip.clone(),
        })
    }

    /// The body is empty (nothing to lose by sending the request again).
    pub fn is_empty(&self) -> bool {
        self.ended
    }
}

impl ClientBody {
    pub fn new(
        body: Incoming,
        limit: u64,
        trailer_strip: Arc<crate::headers::NameSet>,
    ) -> ClientBody {
        ClientBody::of(
            Source::Stream(Limited::new(body, limit as usize)),
            trailer_strip,
        )
    }

    /// A body already read and judged: sent as it is.
    pub fn whole(bytes: Bytes) -> ClientBody {
        ClientBody::of(
            Source::Whole((!bytes.is_empty()).then_some(bytes)),
            Arc::default(),
        )
    }

    fn of(source: Source, trailer_strip: Arc<crate::headers::NameSet>) -> ClientBody {
        ClientBody {
            hint: source.size_hint(),
            ended: source.is_end_stream(),
            body: Some(source),
            slot: None,
            trailer_strip,
        }
    }

    /// This body, and what can hand it out again while nothing of it has been read.
    pub fn replayable(mut self) -> (ClientBody, Replay) {
        let mut replay = Replay {
            slot: None,
            hint: self.hint,
            ended: self.ended,
            trailer_strip: self.trailer_strip.clone(),
        };
        if !self.ended {
            let slot = Arc::new(Mutex::new(self.body.take()));
            replay.slot = Some(slot.clone());
            self.slot = Some(slot);
        }
        (self, replay)
    }
}

/// The client's request body failed: the client's fault, answered 400.
#[derive(Debug)]
pub(super) struct ClientBodyError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.body.is_none() {
            // First read: the body leaves the slot, and can no longer be sent elsewhere.
            match this.slot.take().and_then(|s| s.lock().ok()?.take()) {
                Some(source) => this.body = Some(source),
                None => return Poll::Ready(None),
            }
        }
        let body = match this.body.as_mut() {
            Some(Source::Whole(whole)) => {
                return Poll::Ready(whole.take().map(|b| Ok(Frame::data(b))))
            }
            Some(Source::Stream(body)) => body,
            None => return Poll::Ready(None),
        };
        let polled = Pin::new(body).poll_frame(cx).map_err(|e| {
            if e.is::<LengthLimitError>() {
                e
            } else {
                Box::new(ClientBodyError(e)) as Self::Error
            }
        });
        polled.map_ok(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                crate::headers::strip_hop_by_hop(&mut trailers);
                crate::headers::remove_all(&mut trailers, &this.trailer_strip);
                crate::headers::remove_underscored(&mut trailers);
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        })
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(source) => source.is_end_stream(),
            None => self.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(source) => source.size_hint(),
            None => self.hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_nobody_read_is_handed_out_again_and_once_read_never() {
        let (first, replay) = ClientBody::whole(Bytes::from_static(b"{\"a\":1}")).replayable();
        assert_eq!(first.size_hint().exact(), Some(7));
        assert!(!replay.is_empty());
        // The first attempt never read it (its connection failed): the second gets it whole.
        drop(first);
        let second = replay.again().expect("nothing was read");
        assert_eq!(second.size_hint().exact(), Some(7));
        let bytes = second.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"{\"a\":1}");
        // Read once: never again.
        assert!(replay.again().is_none());
        let (first, empty) = ClientBody::whole(Bytes::new()).replayable();
        assert!(empty.is_empty());
        drop(first.collect().await.unwrap());
        let again = empty.again().expect("an empty body is made again");
        assert!(again.is_end_stream());
    }
}
