//! The access log: one line per request, JSON or Apache combined.
//!
//! Lines are handed to a writer thread through a bounded channel, so a slow disk slows
//! requests (back-pressure) instead of dropping lines fail2ban needs. Query strings and
//! credential headers are never recorded; keys appear as name and fingerprint only.

use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method};
use serde::Serialize;

use crate::auth::Identity;

#[derive(serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    #[default]
    Json,
    /// Apache combined, client IP first: fail2ban's `^<HOST> .* 401 .*$` matches it.
    Combined,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Off,
    File(std::path::PathBuf),
}

/// One request, as logged. Held for every request whether or not the log is on, so it
/// shares what the request already has (method, header values, the identity) instead of
/// copying it into strings.
#[derive(Debug, Clone)]
pub struct Record {
    pub time: SystemTime,
    pub client: IpAddr,
    pub method: Method,
    /// Without the query string.
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    /// Logged as `identity` (its name) and `key_fp` (a key's fingerprint).
    pub identity: Option<Identity>,
    pub request_id: Text,
    pub outcome: &'static str,
    pub user_agent: Option<Text>,
    pub referer: Option<Text>,
    /// With several backend instances: the one that answered (its URL as configured).
    pub upstream: Option<std::sync::Arc<str>>,
}

/// A header value known to be visible ASCII (`HeaderValue::to_str` accepted it).
#[derive(Debug, Clone)]
pub struct Text(HeaderValue);

impl Text {
    pub fn new(v: &HeaderValue) -> Option<Text> {
        v.to_str().is_ok().then(|| Text(v.clone()))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("-")
    }

    pub fn value(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut r = s.serialize_struct("Record", 15)?;
        r.serialize_field(
            "time",
            &humantime::format_rfc3339_millis(self.time).to_string(),
        )?;
        r.serialize_field("client", &self.client)?;
        r.serialize_field("method", self.method.as_str())?;
        r.serialize_field("path", &self.path)?;
        r.serialize_field("protocol", self.protocol)?;
        r.serialize_field("status", &self.status)?;
        r.serialize_field("bytes", &self.bytes)?;
        r.serialize_field("duration_ms", &self.duration_ms)?;
        let identity = self.identity.as_ref();
        r.serialize_field("identity", &identity.and_then(Identity::name))?;
        r.serialize_field("key_fp", &identity.and_then(Identity::fingerprint))?;
        r.serialize_field("request_id", &self.request_id)?;
        r.serialize_field("outcome", self.outcome)?;
        r.serialize_field("user_agent", &self.user_agent)?;
        r.serialize_field("referer", &self.referer)?;
        if let Some(up) = &self.upstream {
            r.serialize_field("upstream", &**up)?;
        }
        r.end()
    }
}

impl Record {
    pub fn set_duration(&mut self, d: Duration) {
        self.duration_ms = (d.as_secs_f64() * 1e6).round() / 1e3;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a record serializes")
    }

    /// Apache combined: `ip - user [time] "METHOD path PROTO" status bytes "referer" "ua"`,
    /// then the request id, duration and outcome. Starts with the client IP, so fail2ban's
    /// `^<HOST> .* 401 .*$` matches it.
    pub fn to_combined(&self) -> String {
        let mut line = format!(
            "{} - {} [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" rid={} dur_ms={} outcome={}",
            self.client,
            self.identity
                .as_ref()
                .and_then(Identity::name)
                .map_or("-".into(), quote_free),
            clf_time(self.time),
            quote_free(self.method.as_str()),
            quote_free(&self.path),
            self.protocol,
            self.status,
            self.bytes,
            self.referer
                .as_ref()
                .map_or("-".into(), |t| quote_free(t.as_str())),
            self.user_agent
                .as_ref()
                .map_or("-".into(), |t| quote_free(t.as_str())),
            self.request_id,
            self.duration_ms,
            self.outcome,
        );
        if let Some(up) = &self.upstream {
            line.push_str(" upstream=");
            line.push_str(&quote_free(up));
        }
        line
    }
}

/// Escape what would break a combined line apart: quotes, backslashes, spaces in names,
/// control characters.
fn quote_free(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `10/Oct/2000:13:55:36 +0000`, from humantime's RFC 3339 rendering.
fn clf_time(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string(); // 2000-10-10T13:55:36Z
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month: usize = s[5..7].parse().unwrap_or(1);
    format!(
        "{}/{}/{}:{} +0000",
        &s[8..10],
        MONTHS[month.clamp(1, 12) - 1],
        &s[0..4],
        &s[11..19]
    )
}

/// What the writer thread is asked to do.
enum Msg {
    Line(String),
    /// Reopen the file (logrotate moved it away): SIGUSR1.
    Reopen,
}

/// Hands access log lines to the writer thread.
#[derive(Clone)]
pub struct AccessLogger {
    tx: Option<SyncSender<Msg>>,
    format: AccessFormat,
}

impl AccessLogger {
    /// Open the destination (a file is created or appended to) and start the writer thread.
    pub fn open(dest: &AccessLog, format: AccessFormat) -> std::io::Result<AccessLogger> {
        let (out, path): (Box<dyn Write + Send>, _) = match dest {
            AccessLog::Off => return Ok(AccessLogger { tx: None, format }),
            AccessLog::Stdout => (Box::new(std::io::stdout()), None),
            AccessLog::File(p) => (Box::new(open_append(p)?), Some(p.clone())),
        };
        let (tx, rx) = sync_channel::<Msg>(16 * 1024);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out, path))?;
        Ok(AccessLogger {
            tx: Some(tx),
            format,
        })
    }

    pub fn off() -> AccessLogger {
        AccessLogger {
            tx: None,
            format: AccessFormat::Json,
        }
    }

    pub fn log(&self, record: &Record) {
        let Some(tx) = &self.tx else { return };
        let line = match self.format {
            AccessFormat::Json => record.to_json(),
            AccessFormat::Combined => record.to_combined(),
        };
        let _ = tx.send(Msg::Line(line));
    }

    /// Reopen a file destination (no effect on stdout or off).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Reopen);
        }
    }
}

fn open_append(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
}

fn write_lines(rx: Receiver<Msg>, out: Box<dyn Write + Send>, path: Option<std::path::PathBuf>) {
    let mut out = BufWriter::new(out);
    let handle = |msg: Msg, out: &mut BufWriter<Box<dyn Write + Send>>| match msg {
        Msg::Line(line) => {
            let _ = writeln!(out, "{line}");
        }
        Msg::Reopen => {
            let _ = out.flush();
            if let Some(p) = &path {
                match open_append(p) {
                    Ok(f) => *out = BufWriter::new(Box::new(f)),
                    // Keep writing to the old file rather than lose lines.
                    Err(e) => {
                        tracing::error!(path = %p.display(), error = %e, "cannot reopen the access log; still writing to the old file")
                    }
                }
            }
        }
    };
    while let Ok(msg) = rx.recv() {
        handle(msg, &mut out);
        // Write what is queued, then flush, so a quiet proxy's lines appear at once.
        while let Ok(msg) = rx.try_recv() {
            handle(msg, &mut out);
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: humantime::parse_rfc3339("2026-11-22T17:05:09Z").unwrap(),
            client: "192.0.2.7".parse().unwrap(),
            method: Method::GET,
            path: "/api/x".into(),
            protocol: "HTTP/1.1",
            status: 401,
            bytes: 12,
            duration_ms: 0.25,
            identity: None,
            request_id: Text::new(&HeaderValue::from_static("abc")).unwrap(),
            outcome: "unauthenticated",
            user_agent: Text::new(&HeaderValue::from_static("curl/8 \"x\"")),
            referer: None,
            upstream: None,
        }
    }

    #[test]
    fn combined_lines_match_the_fail2ban_filter() {
        let line = record().to_combined();
        assert!(line.starts_with("192.0.2.7 - - [22/Nov/2026:17:05:09 +0000] \"GET /api/x HTTP/1.1\" 401 12 \"-\" \"curl/8 \\\"x\\\"\""), "{line}");
        // fail2ban's `^<HOST> .* 401 .*$`
        let after_host = line.split_once(' ').unwrap().1;
        assert!(after_host.contains(" 401 "));
    }

    #[test]
    fn json_lines_carry_every_field() {
        let v: serde_json::Value = serde_json::from_str(&record().to_json()).unwrap();
        for f in [
            "time",
            "client",
            "method",
            "path",
            "status",
            "bytes",
            "duration_ms",
            "identity",
            "key_fp",
            "request_id",
            "outcome",
        ] {
            assert!(v.get(f).is_some(), "{f} missing");
        }
        assert_eq!(v["time"], "2026-11-22T17:05:09.000Z");
    }
}
