//! A POST on the MCP path under tool rules (`[mcp] tool_policy`): its body read up to a bound,
//! parsed strictly ([`super::jsonrpc`]), checked against its `Mcp-Method` / `Mcp-Name`
//! headers, and judged; what is forwarded is exactly the bytes judged.
//!
//! Fails closed: a body over the bound is 413 (never forwarded uninspected); a body that is
//! not one strict JSON-RPC message is 400; headers that disagree with the body are 400 with
//! JSON-RPC error −32020; a call outside the caller's rules never reaches the backend.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::filter::ListFilter;
use super::jsonrpc::{self, ListKind, Message};
use super::policy::{DecidedBy, InFlight, Policy, Verdict};
use crate::access_log::Record;
use crate::auth::Identity;
use crate::authz::McpKind;
use crate::error::{jsonrpc_error, Reject, RPC_DENIED, RPC_HEADER_MISMATCH, RPC_LIMITED};
use crate::headers::single;
use crate::metrics::{McpCallLabels, Metrics, ReasonLabels};

static MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
static MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
static MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// The first revision that requires `Mcp-Method` and `Mcp-Name`.
const HEADERS_REQUIRED_FROM: &str = "2026-07-28";

/// Read a request body whole, up to `limit` bytes, within `within`.
pub async fn read_body<B>(body: B, limit: usize, within: Duration) -> Result<Bytes, Reject>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(within, Limited::new(body, limit).collect()).await {
        Err(_) => Err(Reject::BadRequest),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(Reject::PayloadTooLarge),
        Ok(Err(_)) => Err(Reject::BadRequest),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// An MCP header value as text: plain visible ASCII, or `=?base64?…?=` around the UTF-8
/// bytes of anything else (MCP 2026-07-28). `None` when it is neither.
fn header_text(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    match s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(s.to_string()),
    }
}

/// `Mcp-Method` and `Mcp-Name`, when present, must say what the body says; from revision
/// 2026-07-28 on they must be present. `false`: a mismatch.
pub fn headers_agree(h: &HeaderMap, message: &Message) -> bool {
    let required = h
        .get(&MCP_PROTOCOL_VERSION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() >= HEADERS_REQUIRED_FROM);
    let agree = |header: Option<&HeaderValue>, body: Option<&str>| match (header, body) {
        (None, None) => true,
        (None, Some(_)) => !required,
        (Some(v), Some(b)) => header_text(v).as_deref() == Some(b),
        (Some(_), None) => false,
    };
    let (Ok(named), Ok(method), Ok(name)) = (
        message.named(),
        single(h, &MCP_METHOD),
        single(h, &MCP_NAME),
    ) else {
        return false;
    };
    agree(method, message.method()) && agree(name, named)
}

/// One tools/call, prompts/get or resources/read as its audit line tells it. Kept as parsed:
/// the line's text (the rule, the id, the arguments' digest) is made only when it is written.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub method: &'static str,
    pub name: String,
    /// `allowed`, `denied`, `step_up` or `rate_limited`.
    pub decision: &'static str,
    /// The rule that decided.
    pub rule: DecidedBy,
    /// The JSON-RPC id.
    pub id: Value,
    /// The call's `arguments`: only their digest is logged, unless `audit_arguments`.
    arguments: Option<Value>,
    audit_arguments: bool,
    started: Instant,
}

impl CallRecord {
    /// First 16 hex digits of the SHA-256 of the arguments as serde_json writes them (keys
    /// sorted): tells equal calls apart without revealing them.
    pub fn arguments_sha256(&self) -> Option<String> {
        let written = self.arguments.as_ref()?.to_string();
        Some(crate::auth::api_key::hex(
            &Sha256::digest(written.as_bytes())[..8],
        ))
    }

    /// Write the audit line, once the call's answer has ended.
    pub fn log(&self, record: &Record) {
        let (identity, key_fp) = match &record.identity {
            Some(Identity::Key(k)) => (Some(k.name.as_str()), Some(k.fingerprint.as_str())),
            Some(Identity::Token(t)) => (Some(&*t.subject), Some(t.fingerprint.as_str())),
            Some(i) => (i.name(), None),
            None => (None, None),
        };
        tracing::info!(
            event = "mcp_call",
            identity = identity.unwrap_or("-"),
            key_fp = key_fp.unwrap_or("-"),
            method = self.method,
            tool = %self.name.escape_debug(),
            decision = self.decision,
            rule = %self.rule,
            jsonrpc_id = %self.id.to_string().escape_debug(),
            outcome = record.outcome,
            status = record.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            arguments_sha256 = self.arguments_sha256().as_deref().unwrap_or("-"),
            arguments = self
                .arguments
                .as_ref()
                .filter(|_| self.audit_arguments)
                .map(|a| tracing::field::display(a.to_string().escape_debug().to_string())),
            request_id = %record.request_id,
            client = %record.client,
            "MCP call"
        );
    }
}

/// What judging a POST let through: the bytes to forward, and what the answer needs.
pub struct Judged {
    pub body: Bytes,
    /// A list request: its answer is filtered (or marked private).
    pub list: Option<ListFilter>,
    /// A call counted against a concurrency limit until its answer ends.
    pub in_flight: Option<InFlight>,
}

/// The filter for answers to `identity`: its rules, when they restrict anything.
pub fn list_filter(policy: &Policy, identity: &Identity, metrics: &Metrics) -> ListFilter {
    let (rules, _) = policy.rules(identity);
    let restricted = [McpKind::Tool, McpKind::Prompt, McpKind::Resource]
        .into_iter()
        .any(|k| !rules.unrestricted(k));
    ListFilter {
        rules: restricted.then(|| rules.into_owned()),
        max: policy.config.max_inspect_bytes,
        hidden: metrics.mcp_hidden.clone(),
    }
}

/// Judge one POST body from `identity`. The call's audit record is left in `call` whatever
/// the verdict.
pub async fn judge(
    policy: &Policy,
    identity: &Identity,
    headers: &HeaderMap,
    body: Bytes,
    metrics: &Metrics,
    call: &mut Option<CallRecord>,
) -> Result<Judged, Reject> {
    let count = |reason: &'static str| {
        metrics
            .mcp_invalid
            .get_or_create(&ReasonLabels { reason })
            .inc();
    };
    let invalid = |reason: &'static str| {
        count(reason);
        Reject::InvalidJsonRpc(reason)
    };
    let mut message = jsonrpc::parse(&body).map_err(|r| invalid(r.reason()))?;
    // What a call names, owned: the message is taken apart below.
    let target = message
        .target()
        .map_err(|r| invalid(r.reason()))?
        .map(|(kind, name)| (kind, name.to_string()));
    if !headers_agree(headers, &message) {
        count("header_mismatch");
        let id = match &message {
            Message::Request { id, .. } | Message::Response { id } => Some(id),
            Message::Notification { .. } => None,
        };
        return Err(Reject::McpHeaderMismatch(jsonrpc_error(
            id,
            RPC_HEADER_MISMATCH,
            "Header mismatch: Mcp-Method or Mcp-Name does not match the body.",
            None,
        )));
    }
    let mut judged = Judged {
        body,
        list: None,
        in_flight: None,
    };
    if let Some(method) = message.method() {
        if ListKind::of(method).is_some() {
            judged.list = Some(list_filter(policy, identity, metrics));
            return Ok(judged);
        }
    }
    let Some((kind, name)) = target else {
        return Ok(judged);
    };
    let what = match kind {
        McpKind::Tool => "Tool",
        McpKind::Prompt => "Prompt",
        McpKind::Resource => "Resource",
    };
    let Message::Request { id, params, .. } = &mut message else {
        return Ok(judged);
    };
    let (decision, rule, outcome) = match policy.decide(identity, kind, &name) {
        Verdict::Allow(rule) => {
            let owner = (kind == McpKind::Tool && policy.has_limits())
                .then(|| identity.owner())
                .flatten();
            let limited = match owner {
                Some(owner) => policy.limit(&owner, &name).await,
                None => Ok(None),
            };
            match limited {
                Ok(in_flight) => {
                    judged.in_flight = in_flight;
                    ("allowed", rule, Ok(judged))
                }
                Err(limited) => {
                    let message = format!(
                        "{what} {name:?} is rate limited; retry in {} s.",
                        limited.retry_after
                    );
                    let reject = Reject::ToolRateLimited {
                        body: jsonrpc_error(
                            Some(id),
                            RPC_LIMITED,
                            &message,
                            Some(serde_json::json!({ "retry_after": limited.retry_after })),
                        ),
                        retry_after: limited.retry_after,
                    };
                    ("rate_limited", rule, Err(reject))
                }
            }
        }
        Verdict::Deny(rule) => {
            let message = format!("{what} {name:?} is not permitted.");
            let reject = Reject::ToolDenied(jsonrpc_error(Some(id), RPC_DENIED, &message, None));
            ("denied", rule, Err(reject))
        }
        Verdict::StepUp(scopes) => {
            let reject = Reject::InsufficientScope(scopes.as_str().into());
            ("step_up", DecidedBy::StepUp(scopes), Err(reject))
        }
    };
    metrics
        .mcp_calls
        .get_or_create(&McpCallLabels {
            method: kind.method(),
            decision,
        })
        .inc();
    // The parsed message is not needed past this point: its id and arguments move to the
    // audit record.
    let arguments = params
        .as_mut()
        .and_then(Value::as_object_mut)
        .and_then(|p| p.remove("arguments"));
    *call = Some(CallRecord {
        method: kind.method(),
        name,
        decision,
        rule,
        id: std::mem::take(id),
        arguments,
        audit_arguments: policy.config.audit_arguments,
        started: Instant::now(),
    });
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in list {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn mcp_headers_must_say_what_the_body_says() {
        let call = jsonrpc::parse(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"h\u00e9llo"}}"#,
        )
        .unwrap();
        let ok = |h: &[(&str, &str)]| headers_agree(&headers(h), &call);
        assert!(ok(&[]), "2025 clients send neither");
        assert!(ok(&[
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?aMOpbGxv?=")
        ]));
        assert!(!ok(&[("mcp-method", "tools/list")]));
        assert!(!ok(&[("mcp-method", "tools/call"), ("mcp-name", "other")]));
        assert!(!ok(&[
            ("mcp-method", "tools/call"),
            ("mcp-method", "tools/call")
        ]));
        assert!(!ok(&[("mcp-name", "=?base64?%%%?=")]));
        assert!(
            !ok(&[("mcp-protocol-version", "2026-07-28")]),
            "required from 2026-07-28"
        );
        assert!(!ok(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call")
        ]));
        let list = jsonrpc::parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).unwrap();
        assert!(!headers_agree(&headers(&[("mcp-name", "x")]), &list));
        assert!(headers_agree(
            &headers(&[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/list")
            ]),
            &list
        ));
    }
}
