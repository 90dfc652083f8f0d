//! MCP tool rules (`[mcp] tool_policy`): each identity lists and calls exactly its tools,
//! against the real MCP Python SDK server (SSE and JSON answers) and the official Python and
//! TypeScript SDK clients; raw bodies for what a strict reader must refuse; list filtering in
//! both framings; per-tool limits; the audit line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;

use crate::support::*;

const READER: &str = "mas_reader0000000000000000000000000000000000000000000000";
const ADMIN: &str = "mas_admin00000000000000000000000000000000000000000000000";
const NOTHING: &str = "mas_nothing000000000000000000000000000000000000000000000";

fn keys() -> String {
    format!(
        r#"
[[keys]]
name = "reader"
api_key = "{READER}"
tools = ["search_*", "get_*", "add"]
prompts = ["summarize"]
resources = ["docs://"]

[[keys]]
name = "admin"
api_key = "{ADMIN}"

[[keys]]
name = "nothing"
api_key = "{NOTHING}"
tools = []
"#
    )
}

/// A proxy with tool rules in front of `upstream`: the keys above, alice in htpasswd granted
/// `echo`, and `mcp_extra` lines in `[mcp]`.
async fn proxy_with_rules(upstream: &str, mcp_extra: &str) -> Proxy {
    let htpasswd = format!("alice:{}\n", bcrypt::hash("alice-password-1", 4).unwrap());
    Proxy::start_with_files(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{upstream}\"\n\
             [auth]\nkeys_file = \"keys.toml\"\nhtpasswd_file = \"htpasswd\"\n\
             [mcp]\npath = \"/mcp\"\ntool_policy = true\n{mcp_extra}\n\
             [[mcp.grants]]\nusers = [\"alice\"]\ntools = [\"echo\"]\n"
        ),
        &[("keys.toml", &keys()), ("htpasswd", &htpasswd)],
    )
    .await
}

/// The calls a client reported, by tool: its result text, or its JSON-RPC error code.
fn outcome(out: &serde_json::Value, tool: &str) -> serde_json::Value {
    let call = out["calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .find(|c| c["tool"] == tool)
        .unwrap_or_else(|| panic!("no call of {tool}: {out}"));
    if call["error"].is_object() {
        call["error"]["code"].clone()
    } else {
        call["result"].clone()
    }
}

/// The tools, prompts and resources the server saw named in calls.
fn named_at_server(server: &McpServer) -> Vec<String> {
    server
        .seen()
        .iter()
        .filter_map(|s| s["rpc"]["name"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn each_identity_lists_and_calls_exactly_its_tools_through_the_python_client() {
    for json in [false, true] {
        let Some(server) = McpServer::start(json) else {
            return;
        };
        let proxy = proxy_with_rules(&server.origin(), "").await;
        let url = proxy.url("/mcp");
        let framing = if json { "JSON" } else { "SSE" };

        let out = mcp_client(&[
            "calls",
            &url,
            &bearer(READER),
            "add",
            "delete_all",
            "get_time",
        ])
        .await;
        assert_eq!(
            out["tools"],
            serde_json::json!(["add", "get_time", "search_docs"]),
            "{framing}: {out}"
        );
        assert_eq!(out["prompts"], serde_json::json!(["summarize"]), "{out}");
        assert_eq!(
            out["resources"],
            serde_json::json!(["docs://readme"]),
            "{out}"
        );
        assert_eq!(outcome(&out, "add"), serde_json::json!(["5"]), "{out}");
        assert_eq!(
            outcome(&out, "delete_all"),
            403,
            "a JSON-RPC error the SDK surfaces as the call's error: {out}"
        );
        let denied = &out["calls"][1]["error"]["message"];
        assert!(denied.as_str().unwrap().contains("delete_all"), "{denied}");
        assert_eq!(
            outcome(&out, "get_time"),
            serde_json::json!(["12:00"]),
            "the session outlives a refusal: {out}"
        );

        let out = mcp_client(&["calls", &url, &bearer(ADMIN), "delete_all"]).await;
        assert_eq!(
            out["tools"],
            serde_json::json!(["add", "delete_all", "echo", "get_time", "search_docs"]),
            "a key without rules sees everything: {out}"
        );
        assert_eq!(outcome(&out, "delete_all"), serde_json::json!(["deleted"]));

        let alice = basic_auth("alice", "alice-password-1");
        let out = mcp_client(&["calls", &url, &alice, "echo", "add"]).await;
        assert_eq!(out["tools"], serde_json::json!(["echo"]), "{out}");
        assert_eq!(
            out["prompts"],
            serde_json::json!(["internal_notes", "summarize"])
        );
        assert_eq!(
            outcome(&out, "echo"),
            serde_json::json!(["secret-argument-4242"])
        );
        assert_eq!(outcome(&out, "add"), 403);

        let out = mcp_client(&["calls", &url, &bearer(NOTHING), "get_time"]).await;
        assert_eq!(out["tools"], serde_json::json!([]), "{out}");
        assert_eq!(outcome(&out, "get_time"), 403);

        // The server's own record: every allowed call arrived, no refused one did.
        let named = named_at_server(&server);
        assert_eq!(
            named.iter().filter(|n| *n == "delete_all").count(),
            1,
            "{framing}: only admin's delete_all reached the server: {named:?}"
        );
        assert!(named.contains(&"add".to_string()) && named.contains(&"echo".to_string()));
        assert_eq!(
            named.iter().filter(|n| *n == "get_time").count(),
            1,
            "{named:?}"
        );
        let s = scrape(&proxy).await;
        let calls = |decision: &str| {
            value(
                &s,
                "portcullis_mcp_calls_total",
                &[("method", "tools/call"), ("decision", decision)],
            )
        };
        assert_eq!((calls("allowed"), calls("denied")), (4.0, 3.0), "{framing}");
        assert!(
            value(
                &s,
                "portcullis_mcp_list_entries_hidden_total",
                &[("kind", "tools")]
            ) >= 11.0
        );
    }
}

#[tokio::test]
async fn the_typescript_client_lists_only_its_tools_and_reads_a_refusal_as_the_calls_error() {
    if !ts_sdk_installed() {
        return;
    }
    let Some(server) = McpServer::start(false) else {
        return;
    };
    let proxy = proxy_with_rules(&server.origin(), "").await;
    let out = ts_client(&["calls", &proxy.url("/mcp"), READER, "delete_all", "add"]).await;
    assert_eq!(
        out["tools"],
        serde_json::json!(["add", "get_time", "search_docs"]),
        "{out}"
    );
    assert_eq!(outcome(&out, "delete_all"), 403, "{out}");
    assert_eq!(outcome(&out, "add"), serde_json::json!(["5"]), "{out}");
    assert!(!named_at_server(&server).contains(&"delete_all".to_string()));
}

/// A JSON-RPC backend that records each body it receives and answers `tools/list` with
/// `tools` entries named `tool-0`…, `get_0`… (in SSE when `sse`), and anything else with an
/// empty result.
async fn jsonrpc_backend(sse: bool, tools: usize) -> (Backend, Arc<Mutex<Vec<bytes::Bytes>>>) {
    let bodies: Arc<Mutex<Vec<bytes::Bytes>>> = Arc::default();
    let seen = bodies.clone();
    let backend = Backend::with(move |req: http::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let get = req.method() == http::Method::GET;
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push(body.clone());
            let msg: serde_json::Value = if get {
                serde_json::json!({"id": 1, "method": "tools/list"})
            } else {
                serde_json::from_slice(&body).unwrap_or_default()
            };
            let result = if msg["method"] == "tools/list" {
                let list: Vec<_> = (0..tools)
                    .map(|i| {
                        let name = if i % 2 == 0 {
                            format!("get_{i}")
                        } else {
                            format!("tool-{i}")
                        };
                        serde_json::json!({"name": name, "inputSchema": {"type": "object"}})
                    })
                    .collect();
                serde_json::json!({"tools": list, "nextCursor": "page-2"})
            } else {
                serde_json::json!({})
            };
            let answer = serde_json::json!({"jsonrpc": "2.0", "id": msg["id"], "result": result});
            if sse || get {
                let text = format!(
                    "id: e1\ndata: \n\nevent: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"level\":\"info\",\"data\":\"tool-1 is listed\"}}}}\n\nevent: message\nid: e2\ndata: {answer}\n\n"
                );
                let mut r = http::Response::new(full(text));
                r.headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                r
            } else {
                let mut r = http::Response::new(full(answer.to_string()));
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r.headers_mut()
                    .insert("cache-control", "public, max-age=60".parse().unwrap());
                r
            }
        }
    })
    .await;
    (backend, bodies)
}

fn rpc(id: u32, method: &str, params: serde_json::Value) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

#[tokio::test]
async fn a_list_of_500_tools_is_cut_to_the_callers_in_json_and_in_sse_with_its_cursor() {
    for sse in [false, true] {
        let (backend, _) = jsonrpc_backend(sse, 500).await;
        let proxy = proxy_with_rules(&backend.url(), "").await;
        let auth = bearer(READER);
        let r = send(
            "POST",
            &proxy.url("/mcp"),
            &[
                ("authorization", &auth),
                ("accept", "application/json, text/event-stream"),
                ("accept-encoding", "gzip, br"),
            ],
            &rpc(4, "tools/list", serde_json::json!({})),
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = backend.take();
        assert!(
            seen[0].headers.get("accept-encoding").is_none(),
            "answers to be filtered are asked for uncompressed"
        );
        assert_eq!(r.headers["cache-control"], "private, no-store");
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        let answer: serde_json::Value = if sse {
            assert!(
                text.starts_with("id: e1\ndata: \n\nevent: message\ndata: {\"jsonrpc\""),
                "other events pass as they were: {text}"
            );
            assert!(
                text.contains("tool-1 is listed"),
                "a notification is not a list"
            );
            let line = text
                .lines()
                .find(|l| l.contains("\"result\""))
                .unwrap()
                .strip_prefix("data: ")
                .unwrap();
            assert!(text.contains("id: e2\n"), "the event keeps its id");
            serde_json::from_str(line).unwrap()
        } else {
            serde_json::from_str(&text).unwrap()
        };
        let names: Vec<&str> = answer["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 250, "sse={sse}");
        assert!(names.iter().all(|n| n.starts_with("get_")));
        assert_eq!(answer["result"]["nextCursor"], "page-2");
        assert_eq!(answer["id"], 4);

        // A key without rules gets the whole list, still marked private.
        let r = send(
            "POST",
            &proxy.url("/mcp"),
            &[("authorization", &bearer(ADMIN))],
            &rpc(5, "tools/list", serde_json::json!({})),
        )
        .await;
        assert_eq!(r.headers["cache-control"], "private, no-store");
        assert_eq!(
            String::from_utf8_lossy(&r.body).matches("\"name\"").count(),
            500
        );
    }
    // A list replayed on a GET stream (a resumed POST stream, Last-Event-ID) is cut too.
    let (backend, _) = jsonrpc_backend(true, 10).await;
    let proxy = proxy_with_rules(&backend.url(), "").await;
    let r = send(
        "GET",
        &proxy.url("/mcp"),
        &[("authorization", &bearer(READER)), ("last-event-id", "e1")],
        "",
    )
    .await;
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        text.contains("get_0") && !text.contains("tool-1\""),
        "{text}"
    );
}

#[tokio::test]
async fn bodies_two_parsers_could_read_differently_never_reach_the_backend() {
    let (backend, bodies) = jsonrpc_backend(false, 2).await;
    let proxy = proxy_with_rules(&backend.url(), "max_inspect_bytes = \"2KiB\"").await;
    let auth = bearer(READER);
    let post = async |headers: &[(&str, &str)], body: &str| {
        let mut h = vec![("authorization", auth.as_str())];
        h.extend_from_slice(headers);
        send("POST", &proxy.url("/mcp"), &h, body).await
    };
    let refused = [
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}]"#,
            "batch",
            -32600,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","name":"delete_all"}}"#,
            "duplicate_key",
            -32600,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","n\u0061me":"delete_all"}}"#,
            "duplicate_key",
            -32600,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/ca"#,
            "not_json",
            -32700,
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["add"]}}"#,
            "params",
            -32600,
        ),
    ];
    for (body, reason, code) in refused {
        let r = post(&[], body).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"]["code"], code, "{body}");
        let s = scrape(&proxy).await;
        assert!(
            value(
                &s,
                "portcullis_mcp_invalid_requests_total",
                &[("reason", reason)]
            ) >= 1.0,
            "{reason}"
        );
    }
    // Over the bound: 413, never forwarded uninspected.
    let big = rpc(
        1,
        "tools/call",
        serde_json::json!({"name": "add", "arguments": {"pad": "x".repeat(3000)}}),
    );
    assert_eq!(post(&[], &big).await.status, 413);

    // Mcp-Method / Mcp-Name must say what the body says (MCP 2026-07-28): 400, -32020.
    let call = rpc(9, "tools/call", serde_json::json!({"name": "add"}));
    let r = post(&[("mcp-method", "tools/list")], &call).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], -32020);
    assert_eq!(r.json()["id"], 9);
    let r = post(
        &[("mcp-method", "tools/call"), ("mcp-name", "get_time")],
        &call,
    )
    .await;
    assert_eq!(r.json()["error"]["code"], -32020);
    let r = post(&[("mcp-protocol-version", "2026-07-28")], &call).await;
    assert_eq!(
        r.json()["error"]["code"],
        -32020,
        "required from 2026-07-28"
    );
    assert_eq!(
        bodies.lock().unwrap().len(),
        0,
        "the backend saw none of these"
    );

    // Agreeing headers (a name sent base64, as non-ASCII names are) pass, and the backend
    // gets exactly the bytes that were judged.
    let r = post(
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?YWRk?="),
        ],
        &call,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let spaced = "{ \"jsonrpc\" : \"2.0\", \"id\": 10, \"method\": \"tools/call\", \"params\": {\"name\": \"add\"} }";
    assert_eq!(post(&[], spaced).await.status, 200);
    let seen = bodies.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            bytes::Bytes::from(call.into_bytes()),
            bytes::Bytes::from(spaced)
        ]
    );

    // A denied call: the JSON-RPC error carries the request's id, names the tool, and says
    // nothing of the rules.
    let r = post(
        &[],
        &rpc(77, "tools/call", serde_json::json!({"name": "delete_all"})),
    )
    .await;
    assert_eq!(r.status, 200);
    let e = r.json();
    assert_eq!(e["id"], 77);
    assert_eq!(e["error"]["code"], 403);
    assert_eq!(
        e["error"]["message"],
        "Tool \"delete_all\" is not permitted."
    );
    let r = post(
        &[],
        &rpc(
            78,
            "resources/read",
            serde_json::json!({"uri": "secret://keys"}),
        ),
    )
    .await;
    assert_eq!(
        r.json()["error"]["message"],
        "Resource \"secret://keys\" is not permitted."
    );
    let r = post(
        &[],
        &rpc(
            79,
            "prompts/get",
            serde_json::json!({"name": "internal_notes"}),
        ),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], 403);
    assert_eq!(
        bodies.lock().unwrap().len(),
        2,
        "no refused call reached the backend"
    );

    // Notifications, responses and other methods pass as they are.
    let note = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    assert_eq!(post(&[], note).await.status, 200);
    // A WebSocket's frames are never judged: refused on the MCP path.
    let ws = send(
        "GET",
        &proxy.url("/mcp"),
        &[
            ("authorization", &auth),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    )
    .await;
    assert_eq!(ws.status, 403);
}

#[tokio::test]
async fn a_tool_limit_holds_each_identity_to_its_own_budget_per_tool() {
    let (backend, bodies) = jsonrpc_backend(false, 2).await;
    let proxy = proxy_with_rules(
        &backend.url(),
        "[[mcp.tool_limits]]\ntools = [\"search_*\"]\nrequests_per_second = 1\nburst = 2\n",
    )
    .await;
    let call = async |key: &str, tool: &str| {
        send(
            "POST",
            &proxy.url("/mcp"),
            &[("authorization", &bearer(key))],
            &rpc(3, "tools/call", serde_json::json!({"name": tool})),
        )
        .await
    };
    assert_eq!(
        call(READER, "search_docs").await.json()["result"],
        serde_json::json!({})
    );
    assert_eq!(
        call(READER, "search_docs").await.json()["result"],
        serde_json::json!({})
    );
    let r = call(READER, "search_docs").await;
    assert_eq!(r.status, 200);
    let e = r.json();
    assert_eq!(e["error"]["code"], 429, "{e}");
    assert_eq!(e["id"], 3);
    assert!(e["error"]["data"]["retry_after"].as_u64().unwrap() >= 1);
    assert!(r.headers.contains_key("retry-after"));
    // Another tool, and another identity, have budgets of their own.
    assert!(call(READER, "get_time").await.json()["result"].is_object());
    assert!(call(ADMIN, "search_docs").await.json()["result"].is_object());
    assert_eq!(bodies.lock().unwrap().len(), 4);
    let s = scrape(&proxy).await;
    assert_eq!(
        value(
            &s,
            "portcullis_mcp_calls_total",
            &[("method", "tools/call"), ("decision", "rate_limited")]
        ),
        1.0
    );
}

#[tokio::test]
async fn a_key_s_tools_are_reloaded_with_the_keys_file() {
    let (backend, _) = jsonrpc_backend(false, 4).await;
    let proxy = proxy_with_rules(&backend.url(), "").await;
    let list = async || {
        let r = send(
            "POST",
            &proxy.url("/mcp"),
            &[("authorization", &bearer(READER))],
            &rpc(1, "tools/list", serde_json::json!({})),
        )
        .await;
        let names: Vec<String> = r.json()["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        names
    };
    assert_eq!(list().await, ["get_0", "get_2"]);
    let edited = keys().replace(
        "tools = [\"search_*\", \"get_*\", \"add\"]",
        "tools = [\"tool-*\"]",
    );
    let tmp = proxy.dir.path().join("keys.toml.new");
    std::fs::write(&tmp, edited).unwrap();
    std::fs::rename(&tmp, proxy.dir.path().join("keys.toml")).unwrap();
    eventually(Duration::from_secs(20), async || {
        (list().await == ["tool-1", "tool-3"]).then_some(())
    })
    .await
    .expect("the new rules within 20 s, without a restart");
}

const SECRET_ARGUMENT: &str = "secret-argument-4242";

/// The real binary with tool rules (`mcp_extra` in `[mcp]`) and JSON logs, sent a call of
/// each of `tools` with `{"q": SECRET_ARGUMENT}`: its `mcp_call` lines, every process-log line,
/// and the access log.
async fn audited(mcp_extra: &str, tools: &[&str]) -> (Vec<serde_json::Value>, Vec<String>, String) {
    let (backend, _) = jsonrpc_backend(false, 2).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), keys()).unwrap();
    let Running {
        mut child,
        addr,
        lines,
        ..
    } = run_binary(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[auth]\nkeys_file = \"keys.toml\"\n\
             [mcp]\ntool_policy = true\n{mcp_extra}\n\
             [log]\nformat = \"json\"\naccess_log = \"access.log\"\n",
            backend.url()
        ),
    );
    for (id, tool) in (11..).zip(tools) {
        send(
            "POST",
            &format!("http://{addr}/mcp"),
            &[("authorization", &bearer(READER))],
            &rpc(
                id,
                "tools/call",
                serde_json::json!({"name": tool, "arguments": {"q": SECRET_ARGUMENT}}),
            ),
        )
        .await;
    }
    assert!(stop(&mut child, "-TERM").await.success());
    let logged: Vec<String> = lines.try_iter().collect();
    let calls: Vec<serde_json::Value> = logged
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "mcp_call")
        .collect();
    assert_eq!(calls.len(), tools.len(), "{logged:#?}");
    let access = std::fs::read_to_string(dir.path().join("access.log")).unwrap();
    (calls, logged, access)
}

#[tokio::test]
async fn the_audit_line_names_the_call_and_never_its_arguments() {
    let (calls, logged, access) = audited("", &["search_docs", "delete_all"]).await;
    let fp = &sha256_hex(READER)[..12];
    assert_eq!(calls[0]["identity"], "reader");
    assert_eq!(calls[0]["key_fp"], fp);
    assert_eq!(calls[0]["tool"], "search_docs");
    assert_eq!(calls[0]["decision"], "allowed");
    assert_eq!(calls[0]["rule"], "key tools: \"search_*\"");
    assert_eq!(calls[0]["jsonrpc_id"], "11");
    assert_eq!(calls[0]["outcome"], "ok");
    assert_eq!(calls[1]["decision"], "denied");
    assert_eq!(calls[1]["rule"], "key tools: no match");
    assert_eq!(calls[1]["outcome"], "tool_denied");
    assert_eq!(
        calls[0]["arguments_sha256"], calls[1]["arguments_sha256"],
        "the same arguments, the same digest"
    );
    assert_eq!(calls[0]["arguments_sha256"].as_str().unwrap().len(), 16);
    for text in logged.iter().chain([&access]) {
        assert!(
            !text.contains(SECRET_ARGUMENT),
            "an argument was logged: {text}"
        );
    }

    // Asked for, the arguments are in the line.
    let (calls, _, _) = audited("audit_arguments = true", &["search_docs"]).await;
    assert!(
        calls[0]["arguments"]
            .as_str()
            .unwrap()
            .contains(SECRET_ARGUMENT),
        "{}",
        calls[0]
    );
}

#[test]
fn check_names_each_tool_rule_mistake_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let check = |config: &str| {
        std::fs::write(dir.path().join("proxy.toml"), config).unwrap();
        let out = check_config(dir.path().join("proxy.toml"));
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    std::fs::write(
        dir.path().join("keys.toml"),
        format!("[[keys]]\nname = \"k\"\napi_key = \"{READER}\"\ntools = [\"has space\"]\n"),
    )
    .unwrap();
    let text = check(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[auth]\nkeys_file = \"keys.toml\"\n\
         [mcp]\ntool_policy = true\nmax_inspect_bytes = \"1\"\n\
         [[mcp.grants]]\ntools = [\"x\"]\n\
         [[mcp.grants]]\nusers = [\"bob\"]\n\
         [[mcp.tool_limits]]\ntools = [\"search_*\"]\n",
    );
    for expected in [
        "max_inspect_bytes must be between 1KiB and 64MiB",
        "[[mcp.grants]] names nobody",
        "[[mcp.grants]] grants nothing",
        "[[mcp.tool_limits]] limits nothing",
        "keys.toml:4:9: tools of \"k\"",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    // Rules that would never apply are an error, not a silent hole.
    let text = check(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[auth]\nkeys_file = \"keys.toml\"\n\
         [mcp]\n[[mcp.grants]]\nusers = [\"bob\"]\ntools = [\"x\"]\n",
    );
    assert!(text.contains("only with [mcp] tool_policy = true"));
}
