//! JSON-RPC 2.0 messages as an MCP client POSTs them, parsed strictly: what a proxy that
//! judges a call must read exactly as the server will (MCP.md §3); and list answers filtered to
//! what a caller may use ([`filter_list`]).
//!
//! Fails closed: anything but one JSON object with `"jsonrpc": "2.0"` is refused; so is a
//! batch (removed from MCP in 2025-06-18), an object with a **duplicate key** at any depth
//! (one parser keeping the first `name` while the server keeps the last would be a bypass),
//! a `method` that is not a string, an `id` that is not a string, integer or null, and
//! `params` that are neither an object nor an array. serde_json refuses lone surrogates,
//! trailing data and nesting over 128 levels; keys are compared after unescaping, so `"name"`
//! and `"n\u0061me"` are the same key.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::authz::McpKind;

/// Why a body is not a message this proxy will judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not JSON at all (or trailing data, or a lone surrogate).
    NotJson,
    /// A JSON array: a batch.
    Batch,
    /// JSON, but not an object.
    NotObject,
    /// The same key twice in one object (the key, as unescaped).
    DuplicateKey(String),
    /// `jsonrpc` is missing or not `"2.0"`.
    Version,
    /// A request or notification without a string `method`.
    Method,
    /// An `id` other than a string, an integer or null.
    Id,
    /// `params` other than an object or an array.
    Params,
}

impl Refusal {
    /// The `reason` of logs and of `portcullis_mcp_invalid_requests_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotJson => "not_json",
            Refusal::Batch => "batch",
            Refusal::NotObject => "not_object",
            Refusal::DuplicateKey(_) => "duplicate_key",
            Refusal::Version => "version",
            Refusal::Method => "method",
            Refusal::Id => "id",
            Refusal::Params => "params",
        }
    }
}

/// One message: a request (with `id`), a notification (without), or a response to a
/// request of the server's (with `result` or `error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request {
        id: Value,
        method: String,
        params: Option<Value>,
    },
    Notification {
        method: String,
        params: Option<Value>,
    },
    Response {
        id: Value,
    },
}

impl Message {
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }

    /// What a request names: the tool of `tools/call`, the prompt of `prompts/get`, the URI
    /// of `resources/read`, with the rules that judge it. `Err` when such a request does not
    /// name it with a string.
    pub fn target(&self) -> Result<Option<(McpKind, &str)>, Refusal> {
        let Message::Request { method, .. } = self else {
            return Ok(None);
        };
        let kind = match method.as_str() {
            "tools/call" => McpKind::Tool,
            "prompts/get" => McpKind::Prompt,
            "resources/read" => McpKind::Resource,
            _ => return Ok(None),
        };
        Ok(self.named()?.map(|n| (kind, n)))
    }

    /// What `Mcp-Name` mirrors (MCP 2026-07-28): `params.name` of `tools/call` and
    /// `prompts/get`, `params.uri` of `resources/read`, `resources/subscribe` and
    /// `resources/unsubscribe`. `Err` when such a message does not carry it as a string.
    pub fn named(&self) -> Result<Option<&str>, Refusal> {
        let (Message::Request { method, params, .. } | Message::Notification { method, params }) =
            self
        else {
            return Ok(None);
        };
        let field = match method.as_str() {
            "tools/call" | "prompts/get" => "name",
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
            _ => return Ok(None),
        };
        params
            .as_ref()
            .and_then(|p| p.get(field))
            .and_then(Value::as_str)
            .map(Some)
            .ok_or(Refusal::Params)
    }
}

/// A list an MCP client asks for, whose answer can be filtered to what the caller may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
    /// `resources/templates/list`, judged by the resource rules against `uriTemplate`.
    Templates,
}

impl ListKind {
    /// The list a method asks for, if it is one of these.
    pub fn of(method: &str) -> Option<ListKind> {
        match method {
            "tools/list" => Some(ListKind::Tools),
            "prompts/list" => Some(ListKind::Prompts),
            "resources/list" => Some(ListKind::Resources),
            "resources/templates/list" => Some(ListKind::Templates),
            _ => None,
        }
    }

    /// The result's array, and what names an entry of it.
    pub fn fields(self) -> (&'static str, &'static str) {
        match self {
            ListKind::Tools => ("tools", "name"),
            ListKind::Prompts => ("prompts", "name"),
            ListKind::Resources => ("resources", "uri"),
            ListKind::Templates => ("resourceTemplates", "uriTemplate"),
        }
    }

    /// The rules that decide which entries a caller sees.
    pub fn kind(self) -> McpKind {
        match self {
            ListKind::Tools => McpKind::Tool,
            ListKind::Prompts => McpKind::Prompt,
            ListKind::Resources | ListKind::Templates => McpKind::Resource,
        }
    }
}

/// In a JSON-RPC response to a list request, keep only the entries `keep` accepts (by name,
/// or URI for resources); `nextCursor` and every other field stay as they are. Returns how
/// many entries were removed. Fails closed: an entry without a string name is removed; an
/// error response, or a result without the list, is left alone (there is nothing to show).
pub fn filter_list(response: &mut Value, kind: ListKind, keep: impl Fn(&str) -> bool) -> usize {
    let (list, key) = kind.fields();
    let Some(entries) = response
        .get_mut("result")
        .and_then(|r| r.get_mut(list))
        .and_then(Value::as_array_mut)
    else {
        return 0;
    };
    let before = entries.len();
    entries.retain(|e| e.get(key).and_then(Value::as_str).is_some_and(&keep));
    before - entries.len()
}

/// A JSON value that refuses duplicate object keys while it is read.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            match out.entry(key) {
                serde_json::map::Entry::Occupied(e) => {
                    return Err(serde::de::Error::custom(DuplicateMarker(e.key().clone())));
                }
                serde_json::map::Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// Carries a duplicate key through serde's error type, to be told apart from bad JSON.
struct DuplicateMarker(String);

impl std::fmt::Display for DuplicateMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{DUPLICATE}{}", self.0)
    }
}

const DUPLICATE: &str = "duplicate key: ";

/// Parse a POST body as one JSON-RPC 2.0 message, strictly (see the module doc).
pub fn parse(body: &[u8]) -> Result<Message, Refusal> {
    let value = match serde_json::from_slice::<Strict>(body) {
        Ok(Strict(v)) => v,
        Err(e) => {
            let text = e.to_string();
            return Err(match text.strip_prefix(DUPLICATE) {
                // serde_json appends " at line L column C".
                Some(rest) => Refusal::DuplicateKey(
                    rest.rsplit_once(" at line ")
                        .map_or(rest, |(k, _)| k)
                        .to_string(),
                ),
                None => Refusal::NotJson,
            });
        }
    };
    let mut obj = match value {
        Value::Object(o) => o,
        Value::Array(_) => return Err(Refusal::Batch),
        _ => return Err(Refusal::NotObject),
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(Refusal::Version);
    }
    // The object is taken apart, not copied: a call's arguments can be large.
    let id = match obj.remove("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Null)) => Some(v),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n)),
        Some(_) => return Err(Refusal::Id),
    };
    let params = match obj.remove("params") {
        None => None,
        Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
        Some(_) => return Err(Refusal::Params),
    };
    match (obj.remove("method"), id) {
        (Some(Value::String(method)), Some(id)) => Ok(Message::Request { id, method, params }),
        (Some(Value::String(method)), None) => Ok(Message::Notification { method, params }),
        (Some(_), _) => Err(Refusal::Method),
        (None, Some(id)) if obj.contains_key("result") || obj.contains_key("error") => {
            Ok(Message::Response { id })
        }
        (None, _) => Err(Refusal::Method),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_tools_call_names_its_tool() {
        let m = parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{"q":"x"}}}"#).unwrap();
        assert_eq!(m.method(), Some("tools/call"));
        assert_eq!(m.target(), Ok(Some((McpKind::Tool, "search"))));
        let m = parse(
            br#"{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}}"#,
        )
        .unwrap();
        assert_eq!(m.target(), Ok(Some((McpKind::Resource, "file:///x"))));
        let m = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":3}}"#)
            .unwrap();
        assert_eq!(
            m.target(),
            Err(Refusal::Params),
            "a call must name its tool with a string"
        );
        let n = parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(matches!(n, Message::Notification { .. }));
        let r = parse(br#"{"jsonrpc":"2.0","id":4,"result":{}}"#).unwrap();
        assert!(matches!(r, Message::Response { .. }));
    }

    #[test]
    fn what_two_parsers_could_read_differently_is_refused() {
        let dup = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","name":"delete_all"}}"#;
        assert_eq!(parse(dup), Err(Refusal::DuplicateKey("name".into())));
        // The same key, escaped differently.
        let escaped = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\u0061me":"b"}}"#;
        assert_eq!(parse(escaped), Err(Refusal::DuplicateKey("name".into())));
        let deep = br#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"a":{"b":[{"c":1,"c":2}]}}}"#;
        assert_eq!(parse(deep), Err(Refusal::DuplicateKey("c".into())));
        let top = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#;
        assert_eq!(parse(top), Err(Refusal::DuplicateKey("method".into())));
        assert_eq!(
            parse(br#"[{"jsonrpc":"2.0","id":1,"method":"a"}]"#),
            Err(Refusal::Batch)
        );
        assert_eq!(parse(br#""x""#), Err(Refusal::NotObject));
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"a"} {}"#),
            Err(Refusal::NotJson)
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"\ud800"}"#),
            Err(Refusal::NotJson)
        );
        assert_eq!(parse(br#"{"id":1,"method":"a"}"#), Err(Refusal::Version));
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":7}"#),
            Err(Refusal::Method)
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1.5,"method":"a"}"#),
            Err(Refusal::Id)
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":{},"method":"a"}"#),
            Err(Refusal::Id)
        );
        assert_eq!(
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"a","params":"x"}"#),
            Err(Refusal::Params)
        );
        assert_eq!(parse(br#"{"jsonrpc":"2.0","id":1}"#), Err(Refusal::Method));
        let nested = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"a\",\"params\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(
            parse(nested.as_bytes()),
            Err(Refusal::NotJson),
            "nesting is bounded"
        );
    }

    #[test]
    fn a_list_keeps_what_the_caller_may_use_and_its_cursor() {
        let mut r = serde_json::json!({"jsonrpc": "2.0", "id": 3, "result": {
            "tools": [{"name": "search_docs"}, {"name": "delete_all"}, {"title": "no name"}, {"name": 5}],
            "nextCursor": "c2"
        }});
        let removed = filter_list(&mut r, ListKind::Tools, |n| n.starts_with("search_"));
        assert_eq!(removed, 3);
        assert_eq!(
            r["result"]["tools"],
            serde_json::json!([{"name": "search_docs"}])
        );
        assert_eq!(r["result"]["nextCursor"], "c2");
        let mut r = serde_json::json!({"jsonrpc": "2.0", "id": 4, "result": {
            "resources": [{"uri": "file:///a", "name": "a"}, {"uri": "db://b", "name": "b"}]}});
        assert_eq!(
            filter_list(&mut r, ListKind::Resources, |u| u.starts_with("file:")),
            1
        );
        let mut e =
            serde_json::json!({"jsonrpc": "2.0", "id": 5, "error": {"code": -1, "message": "x"}});
        assert_eq!(filter_list(&mut e, ListKind::Prompts, |_| false), 0);
        assert_eq!(ListKind::of("tools/list"), Some(ListKind::Tools));
        assert_eq!(ListKind::of("tools/call"), None);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever serde_json writes (never a duplicate key), the strict reader reads the same.
        #[test]
        fn the_strict_reader_agrees_with_serde_json_on_valid_documents(params in json_value()) {
            let msg = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "m", "params": [params.clone()]});
            let text = serde_json::to_vec(&msg).unwrap();
            let parsed = parse(&text).unwrap();
            prop_assert_eq!(parsed, Message::Request { id: Value::from(1), method: "m".into(), params: Some(Value::Array(vec![params])) });
        }
    }
}
