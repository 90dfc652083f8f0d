//! The keys file (DESIGN.md §3) and key lookup.
//!
//! Keys are held only as SHA-256 digests: a presented key is hashed and looked up by digest, and
//! the stored digest is then compared in constant time. Neither the plaintext nor the digest is
//! ever logged; a key shows up in logs as its name and a 12-hex-digit fingerprint.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use toml::Spanned;

use crate::authz::{McpKind, McpRules, Rule};
use crate::diag::{parse_toml, Diagnostic, Source};

/// Shortest plaintext key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKeysFile {
    keys: Option<Vec<Spanned<RawKey>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<Spanned<String>>,
    api_key: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    enabled: Option<bool>,
    allow: Option<Vec<Spanned<String>>>,
    expires: Option<Spanned<toml::Value>>,
    description: Option<String>,
    requests_per_second: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
    tools: Option<Spanned<Vec<String>>>,
    prompts: Option<Spanned<Vec<String>>>,
    resources: Option<Spanned<Vec<String>>>,
}

/// One entry of the keys file.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    /// `name` as a header value (the identity header), when it is one.
    pub name_value: Option<http::HeaderValue>,
    digest: [u8; 32],
    /// First 12 hex digits of the key's SHA-256: safe to log, enough to tell keys apart.
    pub fingerprint: String,
    pub enabled: bool,
    pub expires: Option<SystemTime>,
    /// `None`: every method and path.
    pub allow: Option<Vec<Rule>>,
    pub description: Option<String>,
    /// Overrides of `[rate_limit]` for this key.
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
    /// The MCP tools, prompts and resources it may use (`[mcp] tool_policy`).
    pub mcp: McpRules,
    /// How much the key is used; carried over reloads while the key stays in the file.
    pub stats: Arc<KeyStats>,
}

/// Requests made with a key, and when it was last used.
#[derive(Debug, Default)]
pub struct KeyStats {
    requests: std::sync::atomic::AtomicU64,
    /// Unix seconds; 0: never.
    last_used: std::sync::atomic::AtomicU64,
}

impl KeyStats {
    pub fn used(&self, now: SystemTime) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_used.store(secs, Relaxed);
    }

    /// Requests so far, and the last use.
    pub fn snapshot(&self) -> (u64, Option<SystemTime>) {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_used.load(Relaxed);
        (
            self.requests.load(Relaxed),
            (last > 0).then(|| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(last)),
        )
    }
}

impl ApiKey {
    /// The key's SHA-256: what identifies it (names may repeat during a rotation).
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Enabled and not expired at `now`.
    pub fn usable(&self, now: SystemTime) -> bool {
        self.enabled && self.expires.is_none_or(|e| e > now)
    }
}

pub use crate::error::KeyRefusal;

/// Every key of one keys file, by digest.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    by_digest: HashMap<[u8; 32], Arc<ApiKey>>,
}

/// SHA-256 of a key, as the keys file's `sha256` field holds it.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lowercase hex of `bytes` written into `out`, which holds exactly twice as many bytes.
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    assert_eq!(
        out.len(),
        bytes.len() * 2,
        "hex_into: output of the wrong length"
    );
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[(b >> 4) as usize];
        pair[1] = HEX[(b & 15) as usize];
    }
}

/// A new key: a 4-character prefix (`mas_` server, `mau_` user) and 54 characters of URL-safe
/// base64 of 40 bytes from the OS's CSPRNG: 58 characters in all.
pub fn generate(prefix: &str) -> Result<String, getrandom::Error> {
    use base64::Engine;
    let mut bytes = [0u8; 40];
    getrandom::fill(&mut bytes)?;
    let mut key = String::with_capacity(58);
    key.push_str(prefix);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut key);
    Ok(key)
}

/// The keys-file line that stores `key` as its digest only.
pub fn sha256_entry(key: &str) -> String {
    format!("sha256 = \"{}\"", hex(&digest(key.as_bytes())))
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let h = (pair[0] as char).to_digit(16)?;
        let l = (pair[1] as char).to_digit(16)?;
        out[i] = (h << 4 | l) as u8;
    }
    Some(out)
}

/// A key may travel in a header: visible ASCII, no spaces.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// A name travels to the backend in the identity header and into logs.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:+/ ".contains(&b))
}

impl KeySet {
    /// Parse a keys file, reporting every problem with its position.
    pub fn parse(path: &Path, text: &str) -> Result<KeySet, Vec<Diagnostic>> {
        let src = Source { path, text };
        let (raw, mut errors) = parse_toml::<RawKeysFile>(&src);
        let entries = raw.and_then(|r| r.keys).unwrap_or_default();
        let mut set = KeySet {
            by_digest: HashMap::with_capacity(entries.len()),
        };
        // Where each digest was first seen, to name both places of a duplicate.
        let mut seen: HashMap<[u8; 32], usize> = HashMap::with_capacity(entries.len());
        for entry in entries {
            let at = entry.span().start;
            let raw = entry.into_inner();
            let mut err = |span: usize, m: String| errors.push(src.at(span, m));

            let name = match &raw.name {
                Some(n) if is_name(n.get_ref()) => n.get_ref().clone(),
                Some(n) => {
                    err(n.span().start, format!("name \"{}\" must be 1-128 characters of letters, digits, space and - _ . @ : + /", n.get_ref().escape_debug()));
                    continue;
                }
                None => {
                    err(at, "key entry has no name; add name = \"...\" (it is what logs and the backend see)".into());
                    continue;
                }
            };
            let digest = match (&raw.api_key, &raw.sha256) {
                (Some(k), None) => {
                    let key = k.get_ref().trim();
                    if !is_token(key) {
                        err(
                            k.span().start,
                            format!("api_key of \"{name}\" must be printable ASCII without spaces"),
                        );
                        continue;
                    }
                    if key.len() < MIN_KEY_LEN {
                        err(k.span().start, format!("api_key of \"{name}\" is {} characters; use at least {MIN_KEY_LEN} (`portcullis keygen` makes 58)", key.len()));
                        continue;
                    }
                    self::digest(key.as_bytes())
                }
                (None, Some(h)) => match parse_hex32(h.get_ref().trim()) {
                    Some(d) => d,
                    None => {
                        err(h.span().start, format!("sha256 of \"{name}\" must be 64 hex digits; make one with `portcullis hash-key`"));
                        continue;
                    }
                },
                (Some(k), Some(_)) => {
                    err(
                        k.span().start,
                        format!("key \"{name}\" has both api_key and sha256; keep one"),
                    );
                    continue;
                }
                (None, None) => {
                    err(at, format!("key \"{name}\" has neither api_key nor sha256"));
                    continue;
                }
            };
            let expires = match &raw.expires {
                None => None,
                Some(v) => match parse_expiry(v.get_ref()) {
                    Some(t) => Some(t),
                    None => {
                        err(v.span().start, format!("expires of \"{name}\" must be an RFC 3339 time such as \"2027-03-01T00:00:00Z\""));
                        continue;
                    }
                },
            };
            let mut allow = None;
            if let Some(list) = &raw.allow {
                let mut rules = Vec::with_capacity(list.len());
                for r in list {
                    match Rule::parse(r.get_ref()) {
                        Ok(rule) => rules.push(rule),
                        Err(e) => err(r.span().start, format!("allow: {e}")),
                    }
                }
                allow = Some(rules);
            }
            let mut limit = |v: &Option<Spanned<i64>>, field: &str| match v {
                None => None,
                Some(n) if (1..=1_000_000).contains(n.get_ref()) => Some(*n.get_ref() as u32),
                Some(n) => {
                    err(
                        n.span().start,
                        format!("{field} of \"{name}\" must be between 1 and 1000000"),
                    );
                    None
                }
            };
            let requests_per_second = limit(&raw.requests_per_second, "requests_per_second");
            let burst = limit(&raw.burst, "burst");
            let mut mcp = McpRules::ALL;
            for (kind, field) in [
                (McpKind::Tool, &raw.tools),
                (McpKind::Prompt, &raw.prompts),
                (McpKind::Resource, &raw.resources),
            ] {
                let Some(list) = field else { continue };
                if let Err(e) = mcp.set(kind, list.get_ref()) {
                    err(
                        list.span().start,
                        format!("{} of \"{name}\": {e}", kind.field()),
                    );
                }
            }
            let line_of = |offset: usize| src.at(offset, "").line;
            if let Some(first) = seen.get(&digest) {
                err(at, format!("key \"{name}\" is the same key as the entry on line {}; each key may appear once", line_of(*first)));
                continue;
            }
            seen.insert(digest, at);
            set.by_digest.insert(
                digest,
                Arc::new(ApiKey {
                    fingerprint: hex(&digest[..6]),
                    name_value: http::HeaderValue::from_str(&name).ok(),
                    name,
                    digest,
                    enabled: raw.enabled.unwrap_or(true),
                    expires,
                    allow,
                    description: raw.description,
                    requests_per_second,
                    burst,
                    mcp,
                    stats: Arc::default(),
                }),
            );
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            crate::diag::sort(&mut errors);
            Err(errors)
        }
    }

    /// Find the key whose digest is `presented`'s, and say whether it may be used `now`.
    pub fn lookup(&self, presented: &[u8], now: SystemTime) -> Result<Arc<ApiKey>, KeyRefusal> {
        let d = digest(presented);
        // The map compares digests, not keys: timing there reveals only digest bytes, from
        // which nothing about a valid key can be learned. The final check is constant-time.
        let key = self.by_digest.get(&d).ok_or(KeyRefusal::Unknown)?;
        if !bool::from(key.digest.ct_eq(&d)) {
            return Err(KeyRefusal::Unknown);
        }
        if !key.enabled {
            return Err(KeyRefusal::Disabled);
        }
        if key.expires.is_some_and(|e| e <= now) {
            return Err(KeyRefusal::Expired);
        }
        Ok(key.clone())
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Take over the usage counters of the keys `old` also has (same digest).
    pub fn adopt_stats(&mut self, old: &KeySet) {
        for (digest, key) in self.by_digest.iter_mut() {
            if let Some(prev) = old.by_digest.get(digest) {
                Arc::make_mut(key).stats = prev.stats.clone();
            }
        }
    }

    /// Every key, in no particular order.
    /// The key with this digest, usable or not.
    pub fn get(&self, digest: &[u8; 32]) -> Option<&Arc<ApiKey>> {
        self.by_digest.get(digest)
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<ApiKey>> {
        self.by_digest.values()
    }

    /// Whether the key with this digest exists and may be used `now`.
    pub fn usable(&self, digest: &[u8; 32], now: SystemTime) -> bool {
        self.by_digest.get(digest).is_some_and(|k| k.usable(now))
    }

    pub fn enabled_count(&self) -> usize {
        self.by_digest.values().filter(|k| k.enabled).count()
    }
}

fn parse_expiry(v: &toml::Value) -> Option<SystemTime> {
    let text = match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Datetime(d) => d.to_string(),
        _ => return None,
    };
    let t = text.trim();
    humantime::parse_rfc3339(t).ok().or_else(|| {
        // A bare date means midnight UTC at its start.
        (t.len() == 10)
            .then(|| humantime::parse_rfc3339(&format!("{t}T00:00:00Z")).ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[keys]]
name = "production-backend"
api_key = "mas_0aPJ9Q9nUO1Ac1vJTfffXEXs9FyGLf9BzfYgZ_RaHm707wmbfHJNPQ"
enabled = true

[[keys]]
name = "web-application"
sha256 = "0f2ab9d5b1ad9eb5c02a6c39b3b9ec3cc2f2d4a0b7b3fa2e1b2f0b4a3e3c8c01"
allow = ["GET /api/*", "POST /api/v1/invoke"]

[[keys]]
name = "disabled-key"
api_key = "mas_disabled_0000000000000000000000"
enabled = false

[[keys]]
name = "old"
api_key = "mas_expired_00000000000000000000000"
expires = 2020-01-01T00:00:00Z
"#;

    fn set() -> KeySet {
        KeySet::parse(Path::new("keys.toml"), FILE).unwrap()
    }

    #[test]
    fn enabled_key_is_found_by_its_plaintext() {
        let k = set()
            .lookup(
                b"mas_0aPJ9Q9nUO1Ac1vJTfffXEXs9FyGLf9BzfYgZ_RaHm707wmbfHJNPQ",
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(k.name, "production-backend");
        assert_eq!(k.fingerprint.len(), 12);
    }

    #[test]
    fn disabled_unknown_and_expired_keys_are_refused() {
        let s = set();
        let now = SystemTime::now();
        assert_eq!(
            s.lookup(b"mas_disabled_0000000000000000000000", now)
                .unwrap_err(),
            KeyRefusal::Disabled
        );
        assert_eq!(
            s.lookup(b"mas_nope_000000000000000000000000000", now)
                .unwrap_err(),
            KeyRefusal::Unknown
        );
        assert_eq!(
            s.lookup(b"mas_expired_00000000000000000000000", now)
                .unwrap_err(),
            KeyRefusal::Expired
        );
    }

    #[test]
    fn sha256_entries_match_the_key_they_hash() {
        let key = "mas_stored_as_hash_only_000000000";
        let text = format!(
            "[[keys]]\nname = \"h\"\nsha256 = \"{}\"\n",
            hex(&digest(key.as_bytes())).to_uppercase()
        );
        let s = KeySet::parse(Path::new("k"), &text).unwrap();
        assert_eq!(
            s.lookup(key.as_bytes(), SystemTime::now()).unwrap().name,
            "h"
        );
    }

    #[test]
    fn every_bad_entry_is_reported_with_its_line() {
        let text = "[[keys]]\nname = \"a\"\napi_key = \"short\"\n\n[[keys]]\nname = \"b\"\nsha256 = \"xyz\"\n\n\
                    [[keys]]\nname = \"c\"\napi_key = \"mas_0000000000000000000000\"\n[[keys]]\nname = \"d\"\napi_key = \"mas_0000000000000000000000\"\ncolour = 1\n\
                    [[keys]]\napi_key = \"mas_1111111111111111111111\"\nallow = [\"GET api\"]\n";
        let errors = KeySet::parse(Path::new("keys.toml"), text).unwrap_err();
        let lines: Vec<String> = errors.iter().map(|d| d.to_string()).collect();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("keys.toml:3:11: api_key of \"a\" is 5 characters")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("keys.toml:7:10: sha256 of \"b\"")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("keys.toml:15:1: unknown key `colour`")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("same key as the entry on line 9")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("keys.toml:16:1: key entry has no name")),
            "{lines:#?}"
        );
        assert_eq!(lines.len(), 5, "{lines:#?}");
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = generate("mas_").unwrap();
        assert_eq!(k.len(), 58);
        assert!(k.starts_with("mas_"));
        assert!(k[4..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(k, generate("mas_").unwrap());
        let entry = sha256_entry(&k);
        let file = format!("[[keys]]\nname = \"g\"\n{entry}\n");
        let set = KeySet::parse(Path::new("k"), &file).unwrap();
        assert!(set.lookup(k.as_bytes(), SystemTime::now()).is_ok());
    }

    #[test]
    fn expiry_accepts_strings_and_toml_datetimes() {
        for v in [
            "expires = \"2027-03-01T00:00:00Z\"",
            "expires = 2027-03-01T00:00:00Z",
            "expires = \"2027-03-01\"",
        ] {
            let text =
                format!("[[keys]]\nname = \"a\"\napi_key = \"mas_0000000000000000000000\"\n{v}\n");
            let s = KeySet::parse(Path::new("k"), &text).unwrap();
            let k = s.by_digest.values().next().unwrap();
            assert_eq!(
                k.expires,
                Some(humantime::parse_rfc3339("2027-03-01T00:00:00Z").unwrap()),
                "{v}"
            );
        }
    }
}
