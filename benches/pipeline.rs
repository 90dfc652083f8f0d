//! Micro-benchmarks of the per-request work that is the proxy's own: path normalisation, key
//! lookup, header rewriting. `cargo bench --bench pipeline`.
//!
//! The load comparison against nginx (whole requests over loopback) is a separate harness.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use portcullis::auth::api_key::{self, KeySet};
use portcullis::auth::basic::{BasicVerifier, Verdict};
use portcullis::auth::htpasswd::Htpasswd;
use portcullis::headers;

fn keys(n: usize) -> (KeySet, String) {
    let mut text = String::new();
    let mut last = String::new();
    for i in 0..n {
        last = api_key::generate("mas_").unwrap();
        text.push_str(&format!(
            "[[keys]]\nname = \"k{i}\"\napi_key = \"{last}\"\n"
        ));
    }
    (KeySet::parse(Path::new("bench.toml"), &text).unwrap(), last)
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "api.internal:8443"),
        ("user-agent", "python-httpx/0.27"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("connection", "keep-alive"),
        (
            "authorization",
            "Bearer mas_0aPJ9Q9nUO1Ac1vJTfffXEXs9FyGLf9BzfYgZ_RaHm707wmbfHJNPQ",
        ),
        ("x-forwarded-for", "203.0.113.7"),
        ("mcp-session-id", "4f6c1a7e-8d1b-4c1e-9a31-3e2f5b6d7c8a"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    c.bench_function("normalize /api/v1/invoke", |b| {
        b.iter(|| portcullis::path::normalize(std::hint::black_box("/api/v1/invoke")))
    });
    c.bench_function("normalize with dot segments and escapes", |b| {
        b.iter(|| portcullis::path::normalize(std::hint::black_box("/api/./v1/%69nvoke/../invoke")))
    });
    let (set, key) = keys(1000);
    c.bench_function("key lookup among 1000 keys", |b| {
        b.iter(|| set.lookup(std::hint::black_box(key.as_bytes()), SystemTime::now()))
    });
    let ident = HeaderName::from_static("x-authenticated-user");
    let template = request_headers();
    let host = HeaderValue::from_static("api.internal:8443");
    let peer = HeaderValue::from_static("127.0.0.1");
    // What the proxy strips from a request: the spoofable headers and the credentials.
    let mut strip = headers::spoofable(&ident).to_vec();
    strip.extend([
        http::header::AUTHORIZATION,
        HeaderName::from_static("x-api-key"),
    ]);
    let strip: headers::NameSet = strip.into_iter().collect();
    c.bench_function("rewrite request headers", |b| {
        b.iter(|| {
            let mut h = template.clone();
            headers::strip_hop_by_hop(&mut h);
            headers::remove_all(&mut h, &strip);
            headers::set_forwarded(
                &mut h,
                &headers::Forwarded {
                    client_ip: "127.0.0.1".parse().unwrap(),
                    peer: "127.0.0.1".parse().unwrap(),
                    peer_value: &peer,
                    chain: None,
                    proto: "http",
                    client_host: Some(&host),
                },
            );
            h
        })
    });
    // HTTP Basic with bcrypt cost 10, served from the verification cache.
    let file = format!("bench:{}\n", bcrypt::hash("bench password", 10).unwrap());
    let (htpasswd, _) = Htpasswd::parse(Path::new("bench"), &file, false).unwrap();
    let htpasswd = std::sync::Arc::new(htpasswd);
    let verifier = BasicVerifier::new(Duration::from_secs(300), 10_000);
    // Timers: an uncached verification is held to the file's costliest scheme.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ip = "127.0.0.1".parse().unwrap();
    let verdict =
        rt.block_on(verifier.verify(&htpasswd, "bench", b"bench password", ip, Instant::now()));
    assert_eq!(verdict, Verdict::Valid);
    c.bench_function("basic bcrypt-10, cached", |b| {
        b.iter(|| {
            rt.block_on(verifier.verify(&htpasswd, "bench", b"bench password", ip, Instant::now()))
        })
    });
    let ids = headers::RequestIds::new();
    c.bench_function("request id", |b| b.iter(|| ids.next()));
}

/// Resident memory of this process, from /proc (kB).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// The per-request rate limit check, and what a flood of one million distinct client addresses
/// costs in memory before and after housekeeping (printed, not timed).
fn rate_limit(c: &mut Criterion) {
    use portcullis::ratelimit::{Local, Quota, Subject};
    let quota = Quota {
        per_second: 100,
        burst: 200,
    };
    let local = Local::new();
    let key = Subject::Credential(portcullis::auth::CredId::Key([7; 32]));
    c.bench_function("rate limit check, one key", |b| {
        b.iter(|| local.check(&key, quota))
    });

    let flood = Local::new();
    let before = rss_kb();
    for n in 0..1_000_000u32 {
        let ip = std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        let subject = Subject::Address(portcullis::ban::ClientKey::of(ip));
        flood.check(&subject, quota);
    }
    let peak = rss_kb();
    let tracked = flood.tracked();
    std::thread::sleep(Duration::from_millis(50));
    flood.housekeep();
    let after = rss_kb();
    eprintln!(
        "rate limit flood: 1,000,000 distinct IPv4 clients: RSS +{} MB at peak with {} tracked \
         (cleaned when over {}); after housekeeping {} tracked, RSS +{} MB",
        peak.saturating_sub(before) / 1024,
        tracked,
        portcullis::ratelimit::CLEAN_ABOVE,
        flood.tracked(),
        after.saturating_sub(before) / 1024
    );
}

/// What a reload of a large keys file costs: parsing and validating 10,000 keys (the swap
/// itself is one pointer store).
fn reload(c: &mut Criterion) {
    let mut text = String::new();
    for n in 0..10_000u32 {
        let key = format!("mas_reload_bench_key_{n:0>32}");
        text.push_str(&format!(
            "[[keys]]\nname = \"client-{n}\"\n{}\nallow = [\"GET /api/*\", \"POST /api/v1/invoke\"]\n\n",
            portcullis::auth::api_key::sha256_entry(&key)
        ));
    }
    let path = Path::new("keys.toml");
    assert_eq!(KeySet::parse(path, &text).unwrap().len(), 10_000);
    let mut group = c.benchmark_group("reload");
    group.sample_size(10);
    group.bench_function("parse a keys file of 10,000 keys", |b| {
        b.iter(|| KeySet::parse(path, &text).unwrap())
    });
    // The floor under it: the TOML parser alone, before any of our checks.
    group.bench_function("the TOML parse alone", |b| {
        b.iter(|| {
            toml::de::DeTable::parse_recoverable(&text)
                .0
                .into_inner()
                .len()
        })
    });
    group.finish();
}

/// The PKCS#1 RSAPrivateKey inside a PKCS#8 PrivateKeyInfo (SEQUENCE { version, algorithm,
/// OCTET STRING privateKey }): jsonwebtoken signs with the former, rcgen writes the latter.
fn pkcs1_of(pkcs8: &[u8]) -> &[u8] {
    // One DER TLV at `at`: (where its content starts, its length).
    let tlv = |at: usize| -> (usize, usize) {
        let first = pkcs8[at + 1] as usize;
        if first < 0x80 {
            return (at + 2, first);
        }
        let n = first & 0x7f;
        let len = pkcs8[at + 2..at + 2 + n]
            .iter()
            .fold(0usize, |acc, b| acc << 8 | *b as usize);
        (at + 2 + n, len)
    };
    let (body, _) = tlv(0);
    let (v, vlen) = tlv(body);
    let (a, alen) = tlv(v + vlen);
    let (k, klen) = tlv(a + alen);
    &pkcs8[k..k + klen]
}

/// A token signed with a fresh key of `alg`, and the JWKS that verifies it.
fn signed(alg: jsonwebtoken::Algorithm) -> (String, String) {
    use jsonwebtoken::{EncodingKey, Header};
    let (pair, key) = match alg {
        jsonwebtoken::Algorithm::RS256 => {
            let pair =
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                    .unwrap();
            let key = EncodingKey::from_rsa_der(pkcs1_of(&pair.serialize_der()));
            (pair, key)
        }
        _ => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let key = EncodingKey::from_ec_der(&pair.serialize_der());
            (pair, key)
        }
    };
    drop(pair);
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some("bench".into());
    let mut header = Header::new(alg);
    header.kid = Some("bench".into());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://idp.example.com/realms/acme",
        "aud": "https://mcp.example.com/mcp",
        "sub": "alice",
        "scope": "mcp:tools",
        "iat": now,
        "exp": now + 3600,
    });
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    (token, serde_json::json!({ "keys": [jwk] }).to_string())
}

/// The cost of a token check with the key set cached: header, signature, claims, identity.
fn jwt(c: &mut Criterion) {
    use portcullis::auth::jwt::{JwkKeys, JwksSource, Jwt, JwtConfig};
    use sha2::Digest;
    let config = JwtConfig {
        issuer: "https://idp.example.com/realms/acme".into(),
        source: JwksSource::Discover,
        audiences: vec!["https://mcp.example.com/mcp".into()],
        algorithms: vec![
            jsonwebtoken::Algorithm::RS256,
            jsonwebtoken::Algorithm::ES256,
        ],
        leeway: Duration::from_secs(60),
        identity_claim: "sub".into(),
        required_scopes: vec!["mcp:tools".into()],
        typ: None,
        refresh_interval: Duration::from_secs(300),
        min_refresh_interval: Duration::from_secs(30),
        fetch_timeout: Duration::from_secs(5),
        roots: std::sync::Arc::new(rustls::RootCertStore::empty()),
        file_keys: None,
    };
    let jwt = Jwt::new(config);
    for (name, alg) in [
        (
            "jwt RS256 (2048-bit), keys cached",
            jsonwebtoken::Algorithm::RS256,
        ),
        ("jwt ES256, keys cached", jsonwebtoken::Algorithm::ES256),
    ] {
        let (token, jwks) = signed(alg);
        let (keys, _) = JwkKeys::parse(&jwks).unwrap();
        // The digest, as the proxy takes it of every token (its remembered-token key).
        let check = || {
            let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            jwt.verify(&token, &digest, &keys).unwrap()
        };
        assert_eq!(&*check().subject, "alice");
        c.bench_function(name, |b| b.iter(check));
    }
}

/// MCP tool rules: judging one `tools/call` body (strict parse, `Mcp-*` headers, the key's
/// rules), and filtering a list answer of 500 tools to the half a key may use, in JSON and as
/// one SSE event.
fn mcp(c: &mut Criterion) {
    use portcullis::authz::{McpKind, McpRules};
    use portcullis::mcp::inspect::headers_agree;
    use portcullis::mcp::jsonrpc::{self, filter_list, ListKind};
    use portcullis::mcp::sse::Events;
    let call = br#"{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"search_docs","arguments":{"query":"quarterly report","limit":10}}}"#;
    let rules = McpRules::parse_field(McpKind::Tool, &["search_*", "get_*"]).unwrap();
    let mut h = HeaderMap::new();
    h.insert("mcp-method", HeaderValue::from_static("tools/call"));
    h.insert("mcp-name", HeaderValue::from_static("search_docs"));
    let mut group = c.benchmark_group("mcp");
    group.bench_function("judge a tools/call body", |b| {
        b.iter(|| {
            let m = jsonrpc::parse(call).unwrap();
            assert!(headers_agree(&h, &m));
            let (kind, name) = m.target().unwrap().unwrap();
            rules.permits(kind, name).is_some()
        })
    });
    let tools: Vec<_> = (0..500)
        .map(|i| {
            let name = if i % 2 == 0 {
                format!("get_{i}")
            } else {
                format!("other_{i}")
            };
            serde_json::json!({"name": name, "description": "A tool of the benchmark, with a description of ordinary length.",
                "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}})
        })
        .collect();
    let answer = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": tools, "nextCursor": "c"}})
        .to_string();
    let keep = |n: &str| rules.permits(McpKind::Tool, n).is_some();
    let filter_json = |bytes: &[u8]| {
        let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(filter_list(&mut v, ListKind::Tools, keep), 250);
        v.to_string()
    };
    println!("a 500-tool list answer: {} bytes", answer.len());
    group.bench_function("filter a 500-tool list answer (JSON)", |b| {
        b.iter(|| filter_json(answer.as_bytes()))
    });
    let event = format!("event: message\nid: 7\ndata: {answer}\n\n");
    group.bench_function("filter a 500-tool list answer (one SSE event)", |b| {
        b.iter(|| {
            let mut events = Events::new(4 << 20);
            let e = events.push(event.as_bytes()).unwrap().pop().unwrap();
            e.with_data(&filter_json(e.data.as_deref().unwrap().as_bytes()))
        })
    });
    group.finish();
}

criterion_group!(benches, bench, rate_limit, reload, jwt, mcp);
criterion_main!(benches);
