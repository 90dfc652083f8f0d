//! Server-Sent Events read as they arrive (the WHATWG `text/event-stream` framing), so that an
//! answer's JSON-RPC messages can be judged and rewritten one event at a time while every other
//! event is passed on at once.
//!
//! [`Events::push`] takes bytes as they come off the backend and returns whole events; a
//! partial event waits for its end. Lines end with CRLF, LF or CR; an event ends at a blank
//! line. An event is kept as its raw bytes (passed on unchanged when nobody rewrites it) with
//! its `data` joined as the spec joins it (lines joined with LF).
//!
//! Fails closed: an event that grows past the bound is an error (the caller ends the stream)
//! rather than something passed on unjudged. A CR that ends the bytes so far waits for the next
//! byte (it may be the first half of a CRLF), so a stream that uses bare CRs sees each event
//! when the next byte comes; MCP servers write LF.

/// One event: its bytes as received (blank line included), and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub raw: Vec<u8>,
    /// The `data` field's lines joined with LF (`None`: no `data` line at all).
    pub data: Option<String>,
}

impl Event {
    /// The same event with its data replaced by `data` (one `data:` line per line of it), its
    /// other fields (`event`, `id`, `retry`, comments) kept in order.
    pub fn with_data(&self, data: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        let mut wrote = false;
        for line in lines(&self.raw) {
            if line.is_empty() {
                continue;
            }
            if field(line).0 == b"data" {
                if !wrote {
                    for d in data.split('\n') {
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(d.as_bytes());
                        out.push(b'\n');
                    }
                    wrote = true;
                }
            } else {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
        }
        out.push(b'\n');
        out
    }
}

/// The event stream's reader.
#[derive(Debug)]
pub struct Events {
    buf: Vec<u8>,
    /// Where the scan for the end of the current event resumes.
    scanned: usize,
    max_event: usize,
}

/// An event over the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge;

impl Events {
    pub fn new(max_event: usize) -> Events {
        Events {
            buf: Vec::new(),
            scanned: 0,
            max_event,
        }
    }

    /// Bytes that arrived; the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Event>, TooLarge> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.event_end() {
            let raw: Vec<u8> = self.buf.drain(..end).collect();
            self.scanned = 0;
            events.push(Event {
                data: data_of(&raw),
                raw,
            });
        }
        if self.buf.len() > self.max_event {
            return Err(TooLarge);
        }
        Ok(events)
    }

    /// What is left when the stream ends: an unterminated event is dropped, as a browser's
    /// EventSource drops it.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The end (exclusive) of the first whole event in the buffer: after a blank line.
    fn event_end(&mut self) -> Option<usize> {
        let b = &self.buf;
        // A line starts at `start`; a blank line is a line break right at a line start.
        let mut i = self.scanned;
        let mut line_start = i == 0 || matches!(b.get(i.wrapping_sub(1)), Some(b'\n' | b'\r'));
        while i < b.len() {
            match b[i] {
                b'\r' => {
                    // CR LF is one break; a CR at the very end may still be followed by LF.
                    let next = b.get(i + 1);
                    if next.is_none() {
                        self.scanned = i;
                        return None;
                    }
                    let len = if next == Some(&b'\n') { 2 } else { 1 };
                    if line_start {
                        return Some(i + len);
                    }
                    line_start = true;
                    i += len;
                }
                b'\n' => {
                    if line_start {
                        return Some(i + 1);
                    }
                    line_start = true;
                    i += 1;
                }
                _ => {
                    line_start = false;
                    i += 1;
                }
            }
        }
        self.scanned = i;
        None
    }
}

/// The lines of an event's bytes, without their line breaks.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = raw;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .iter()
            .position(|&c| c == b'\n' || c == b'\r')
            .unwrap_or(rest.len());
        let line = &rest[..end];
        let skip = match (rest.get(end), rest.get(end + 1)) {
            (Some(b'\r'), Some(b'\n')) => 2,
            (Some(_), _) => 1,
            (None, _) => 0,
        };
        rest = &rest[end + skip..];
        Some(line)
    })
}

/// A line's field name and value (one leading space of the value removed).
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&c| c == b':') {
        Some(i) => {
            let v = &line[i + 1..];
            (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, b""),
    }
}

fn data_of(raw: &[u8]) -> Option<String> {
    let values: Vec<&[u8]> = lines(raw)
        .filter(|line| !line.is_empty())
        .map(field)
        .filter(|(name, _)| *name == b"data")
        .map(|(_, value)| value)
        .collect();
    (!values.is_empty()).then(|| String::from_utf8_lossy(&values.join(&b'\n')).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(bytes: &[u8]) -> Vec<Event> {
        let mut e = Events::new(1 << 20);
        e.push(bytes).unwrap()
    }

    #[test]
    fn events_end_at_a_blank_line_whatever_the_line_breaks() {
        for stream in [
            &b"event: message\ndata: {\"a\":1}\n\n"[..],
            b"event: message\r\ndata: {\"a\":1}\r\n\r\n",
            b"event: message\rdata: {\"a\":1}\r\r",
        ] {
            // A final bare CR is seen once the next byte shows it is not half a CRLF.
            let events = all(&[stream, b"data: next"].concat());
            assert_eq!(events.len(), 1, "{stream:?}");
            assert_eq!(events[0].data.as_deref(), Some("{\"a\":1}"));
            assert_eq!(events[0].raw, stream);
        }
        let two = all(b": comment\n\ndata: a\ndata: b\nid: 7\n\ndata: partial");
        assert_eq!(two.len(), 2);
        assert_eq!(two[0].data, None, "a comment alone has no data");
        assert_eq!(two[1].data.as_deref(), Some("a\nb"));
        assert_eq!(
            all(b"data\ndata: b\n\n")[0].data.as_deref(),
            Some("\nb"),
            "an empty data line counts"
        );
    }

    #[test]
    fn rewriting_keeps_the_other_fields() {
        let e = &all(b"event: message\nid: 42\ndata: {\"x\":\ndata: 1}\nretry: 5\n\n")[0];
        assert_eq!(e.data.as_deref(), Some("{\"x\":\n1}"));
        let out = e.with_data("{\"y\":2}");
        assert_eq!(
            out,
            b"event: message\nid: 42\ndata: {\"y\":2}\nretry: 5\n\n"
        );
        assert_eq!(all(&out)[0].data.as_deref(), Some("{\"y\":2}"));
    }

    #[test]
    fn an_event_over_the_bound_is_an_error() {
        let mut e = Events::new(16);
        assert_eq!(e.push(b"data: 0123456789"), Ok(vec![]));
        assert_eq!(e.push(b"0123456789"), Err(TooLarge));
        let mut e = Events::new(16);
        assert_eq!(
            e.push(b"data: 0123456789\n\n").unwrap().len(),
            1,
            "a whole event is fine"
        );
    }

    proptest! {
        /// However the stream is cut into chunks, the same events come out.
        #[test]
        fn chunking_never_changes_the_events(
            parts in prop::collection::vec(prop::sample::select(vec![
                "data: {\"id\":1}", "\n", "\r\n", "\r", "event: message", ": c", "id: 9",
            ]), 0..40),
            cuts in prop::collection::vec(0usize..200, 0..10),
        ) {
            let stream: Vec<u8> = parts.concat().into_bytes();
            let whole = all(&stream);
            let mut e = Events::new(1 << 20);
            let mut got = Vec::new();
            let mut at = 0;
            let mut cuts = cuts;
            cuts.sort_unstable();
            for c in cuts.into_iter().map(|c| c.min(stream.len())) {
                if c > at {
                    got.extend(e.push(&stream[at..c]).unwrap());
                    at = c;
                }
            }
            got.extend(e.push(&stream[at..]).unwrap());
            prop_assert_eq!(got, whole);
        }
    }
}
