//! JWT access tokens from an OAuth 2.1 / OIDC issuer (`[auth.jwt]`, DESIGN.md §9): the key set
//! a token is checked against ([`JwkKeys`], from a JWKS document) and the check itself
//! ([`Jwt::verify`]). The JOSE work (signatures, `exp`/`nbf`/`iss`/`aud`) is jsonwebtoken's,
//! over aws-lc-rs, the provider rustls already uses.
//!
//! Fails closed: a token is accepted only when its header names an algorithm on the
//! allow-list (never `none`, never HMAC), a key of the issuer's set of the same type and
//! curve verifies its signature, `iss` is the issuer exactly, `aud` names one of the
//! audiences, `exp` has not passed (and `nbf` has) within the leeway, the identity claim is a
//! printable string, and every required scope is granted. Anything else is a refusal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Uri};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::diag::Diagnostic;
use crate::error::{Reject, TokenRefusal};

/// Where the issuer's signing keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// `jwks_url`: fetched and refreshed.
    Url(Uri),
    /// Neither `jwks_url` nor `jwks_file`: the `jwks_uri` of the issuer's metadata
    /// (`/.well-known/openid-configuration`, then `/.well-known/oauth-authorization-server`).
    Discover,
    /// `jwks_file`: read at start, watched and reloaded like the keys file.
    File(PathBuf),
}

/// `[auth.jwt]`, validated.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub issuer: String,
    pub source: JwksSource,
    /// `aud` must name one of these.
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    /// The claim whose (string) value is the identity.
    pub identity_claim: String,
    /// Every one of these must be granted (`scope` or `scp`), else 403 `insufficient_scope`.
    pub required_scopes: Vec<String>,
    /// The token header's `typ` must be this (e.g. `at+jwt`, RFC 9068), when set.
    pub typ: Option<String>,
    /// The longest a fetched key set is used before it is fetched again.
    pub refresh_interval: Duration,
    /// The shortest time between two fetches: the floor under the server's cache headers and
    /// the pace of refetches for an unknown `kid` and of retries after a failure.
    pub min_refresh_interval: Duration,
    /// One fetch (connect, answer, body) at most.
    pub fetch_timeout: Duration,
    /// The trust anchors for `https://` fetches: `ca`, else the system's store.
    pub roots: Arc<rustls::RootCertStore>,
    /// From `jwks_file`, loaded at validation time.
    pub file_keys: Option<JwkKeys>,
}

/// The key type and curve a key can verify, which the token's `alg` must agree with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::P256, ES256)
                | (KeyKind::P384, ES384)
                | (KeyKind::Ed25519, EdDSA)
        )
    }
}

/// One verification key of the issuer's set.
pub struct VerifyKey {
    key: DecodingKey,
    kind: KeyKind,
    /// The JWK's own `alg`, when it names one: the token's must be the same.
    alg: Option<Algorithm>,
}

/// An issuer's signing keys, by `kid`. Keys that cannot verify a signature here (encryption
/// keys, symmetric keys, unknown types) are left out, with a note.
#[derive(Clone, Default)]
pub struct JwkKeys {
    by_kid: HashMap<String, Arc<VerifyKey>>,
    /// Keys without a `kid`: usable only by a token without one, when exactly one fits.
    unnamed: Vec<Arc<VerifyKey>>,
}

impl std::fmt::Debug for JwkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwkKeys")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("unnamed", &self.unnamed.len())
            .finish()
    }
}

impl JwkKeys {
    /// Parse a JWKS document (RFC 7517 §5). `Err`: not a key set at all, or no usable key in
    /// it (an empty set would refuse every token: the last good one is better). `Ok` carries
    /// notes about the keys left out.
    pub fn parse(text: &str) -> Result<(JwkKeys, Vec<String>), String> {
        JwkKeys::parse_at(text).map_err(|(_, _, e)| e)
    }

    /// [`JwkKeys::parse`], with the line and column of a JSON syntax error (1:1 otherwise).
    fn parse_at(text: &str) -> Result<(JwkKeys, Vec<String>), (usize, usize, String)> {
        let doc: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| (e.line().max(1), e.column().max(1), format!("not JSON: {e}")))?;
        let whole = |e: String| (1, 1, e);
        let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
            return Err(whole("not a JWKS: no \"keys\" array".into()));
        };
        let mut set = JwkKeys::default();
        let mut notes = Vec::new();
        for (i, raw) in keys.iter().enumerate() {
            let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
            let label = kid
                .as_deref()
                .map_or_else(|| format!("key {i}"), |k| format!("key {i} (kid {k:?})"));
            match VerifyKey::from_value(raw) {
                Ok(key) => {
                    let key = Arc::new(key);
                    match kid {
                        Some(kid) => {
                            if set.by_kid.insert(kid, key).is_some() {
                                notes.push(format!(
                                    "{label}: a second key with this kid; the last one is used"
                                ));
                            }
                        }
                        None => set.unnamed.push(key),
                    }
                }
                Err(why) => notes.push(format!("{label} left out: {why}")),
            }
        }
        if set.is_empty() {
            let why = if notes.is_empty() {
                "the set is empty".to_string()
            } else {
                notes.join("; ")
            };
            return Err(whole(format!("no signing key usable: {why}")));
        }
        Ok((set, notes))
    }

    /// [`JwkKeys::parse`] for the file loader: a refusal names the file.
    pub fn parse_file(path: &Path, text: &str) -> Result<JwkKeys, Vec<Diagnostic>> {
        match JwkKeys::parse_at(text) {
            Ok((keys, notes)) => {
                for n in notes {
                    tracing::warn!(file = %path.display(), "JWKS: {n}");
                }
                Ok(keys)
            }
            Err((line, col, e)) => Err(vec![Diagnostic {
                file: path.to_path_buf(),
                line,
                col,
                message: format!("{e}; write the issuer's JWKS document ({{\"keys\": [...]}})"),
            }]),
        }
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// The key for a token with this `kid` (or none) and `alg`. `Err(UnknownKey)` when the set
    /// has no such key (a refetch may help); `Err(Algorithm)` when it has one of another type.
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<&VerifyKey, TokenRefusal> {
        let key = match kid {
            Some(kid) => self.by_kid.get(kid).ok_or(TokenRefusal::UnknownKey)?,
            None => {
                let mut fitting = self.unnamed.iter().filter(|k| k.kind.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => k,
                    _ => return Err(TokenRefusal::UnknownKey),
                }
            }
        };
        if !key.kind.fits(alg) || key.alg.is_some_and(|a| a != alg) {
            return Err(TokenRefusal::Algorithm);
        }
        Ok(key)
    }
}

impl VerifyKey {
    fn from_value(raw: &serde_json::Value) -> Result<VerifyKey, String> {
        if let Some(u) = raw.get("use").and_then(|u| u.as_str()) {
            if u != "sig" {
                return Err(format!("\"use\": {u:?} is not \"sig\""));
            }
        }
        // The JWK's own alg, read as text so that an encryption alg is a note, not a failure
        // of the whole set.
        let alg = match raw.get("alg").and_then(|a| a.as_str()) {
            None => None,
            Some(a) => Some(
                a.parse::<Algorithm>()
                    .map_err(|_| format!("\"alg\": {a:?} is not a signature algorithm"))?,
            ),
        };
        let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            return Err("not a signature key".into());
        }
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                _ => return Err("an elliptic curve other than P-256 and P-384".into()),
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                KeyKind::Ed25519
            }
            AlgorithmParameters::OctetKeyPair(_) => {
                return Err("an octet key pair other than Ed25519".into())
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err("a symmetric (\"oct\") key: HMAC tokens are never accepted".into())
            }
            _ => return Err("a key type other than RSA, EC and OKP".into()),
        };
        if let Some(a) = alg {
            if !kind.fits(a) {
                return Err(format!("\"alg\": {a:?} does not fit the key's type"));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("not a valid key: {e}"))?;
        Ok(VerifyKey { key, kind, alg })
    }
}

/// A verified token's identity.
#[derive(Debug)]
pub struct TokenIdentity {
    /// The identity claim's value: what the identity header and logs carry.
    pub subject: Arc<str>,
    /// The same, as a header value.
    pub value: Option<HeaderValue>,
    /// The first 12 hex digits of the token's SHA-256: tells tokens apart in logs without
    /// being one.
    pub fingerprint: String,
    /// The scopes granted (`scope` or `scp`).
    pub scopes: Vec<String>,
    /// `exp` plus the leeway: a stream opened with the token ends then.
    pub expires: SystemTime,
}

/// Whether a `Bearer` value has the shape of a JWS compact serialization: three base64url
/// parts, the first a JSON object (`eyJ`); the signature may be empty (an unsigned token is
/// still judged, and refused, as a token). API keys never have this shape.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(h), Some(p), Some(s), None)
            if h.starts_with("eyJ") && b64(h) && b64(p) && (s.is_empty() || b64(s))
    )
}

/// The check of a token against a key set (the set itself is kept by `jwks`).
pub struct Jwt {
    pub config: JwtConfig,
    validation: HashMap<Algorithm, Validation>,
}

impl Jwt {
    pub fn new(config: JwtConfig) -> Jwt {
        let validation = config
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.algorithms = vec![alg];
                v.leeway = config.leeway.as_secs();
                v.validate_nbf = true;
                v.validate_exp = true;
                v.set_issuer(&[&config.issuer]);
                v.set_audience(&config.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                (alg, v)
            })
            .collect();
        Jwt { config, validation }
    }

    /// The header's `kid` and `alg`, checked against the allow-list and `typ`; no signature
    /// is looked at yet. `alg: none` and HMAC are refused here (jsonwebtoken does not even
    /// parse `none`; HMAC is never on the allow-list).
    pub fn header(&self, token: &str) -> Result<(Option<String>, Algorithm), TokenRefusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRefusal::Malformed)?;
        if !self.validation.contains_key(&header.alg) {
            return Err(TokenRefusal::Algorithm);
        }
        if let Some(want) = &self.config.typ {
            let typ = header.typ.as_deref().unwrap_or("");
            let typ = typ
                .strip_prefix("application/")
                .or_else(|| typ.strip_prefix("APPLICATION/"))
                .unwrap_or(typ);
            if !typ.eq_ignore_ascii_case(want) {
                return Err(TokenRefusal::Type);
            }
        }
        Ok((header.kid, header.alg))
    }

    /// Verify `token` (whose SHA-256 is `digest`) with the key `keys` holds for it.
    /// `Err(Reject::InvalidJwt(UnknownKey))` when the set has no key with the token's `kid`
    /// (the caller may refetch and try again).
    pub fn verify(
        &self,
        token: &str,
        digest: &[u8; 32],
        keys: &JwkKeys,
    ) -> Result<TokenIdentity, Reject> {
        let refuse = |r| Reject::InvalidJwt(r);
        let (kid, alg) = self.header(token).map_err(refuse)?;
        let key = keys.find(kid.as_deref(), alg).map_err(refuse)?;
        let validation = &self.validation[&alg];
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token, &key.key, validation,
        )
        .map_err(|e| refuse(refusal_of(e.kind())))?;
        let claims = data.claims;
        let subject = claims
            .get(&self.config.identity_claim)
            .and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty() && s.len() <= 256 && s.chars().all(|c| !c.is_control()))
            .ok_or(refuse(TokenRefusal::Claims))?;
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_f64())
            .ok_or(refuse(TokenRefusal::Claims))?;
        // Usable until `exp` plus the leeway, as the check above judged it.
        let expires =
            SystemTime::UNIX_EPOCH + Duration::from_secs_f64(exp.max(0.0)) + self.config.leeway;
        let scopes = scopes_of(&claims);
        let missing: Vec<&str> = self
            .config
            .required_scopes
            .iter()
            .filter(|s| !scopes.contains(s))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Reject::InsufficientScope(
                self.config.required_scopes.join(" ").into(),
            ));
        }
        let fingerprint = crate::auth::api_key::hex(digest)[..12].to_string();
        Ok(TokenIdentity {
            value: HeaderValue::from_str(&subject).ok(),
            subject: subject.into(),
            fingerprint,
            scopes,
            expires,
        })
    }
}

/// The scopes a token grants: `scope` (space separated, RFC 8693 / RFC 9068) or `scp` (an
/// array, or a string, as Entra ID and Okta write it).
fn scopes_of(claims: &serde_json::Map<String, serde_json::Value>) -> Vec<String> {
    let split = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    match (claims.get("scope"), claims.get("scp")) {
        (Some(serde_json::Value::String(s)), _) => split(s),
        (_, Some(serde_json::Value::String(s))) => split(s),
        (_, Some(serde_json::Value::Array(a))) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn refusal_of(kind: &jsonwebtoken::errors::ErrorKind) -> TokenRefusal {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature => TokenRefusal::Signature,
        K::ExpiredSignature => TokenRefusal::Expired,
        K::ImmatureSignature => TokenRefusal::NotYetValid,
        K::InvalidIssuer => TokenRefusal::Issuer,
        K::InvalidAudience => TokenRefusal::Audience,
        K::InvalidAlgorithm | K::MissingAlgorithm => TokenRefusal::Algorithm,
        K::MissingRequiredClaim(c) if c == "aud" => TokenRefusal::Audience,
        K::MissingRequiredClaim(c) if c == "iss" => TokenRefusal::Issuer,
        K::MissingRequiredClaim(_) | K::InvalidClaimFormat(_) => TokenRefusal::Claims,
        _ => TokenRefusal::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_three_base64url_parts_with_a_json_header_look_like_a_jwt() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"));
        assert!(
            looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
            "unsigned"
        );
        for not in [
            "mas_0aPJ9Q9nUO1Ac1vJTfffXEXs9FyGLf9BzfYgZ_RaHm707wmbfHJNPQ",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0",
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln.x",
            "abc.def.ghi",
            "eyJ+.eyJ.sig",
        ] {
            assert!(!looks_like_jwt(not), "{not}");
        }
    }

    #[test]
    fn symmetric_and_encryption_keys_are_left_out_and_an_empty_set_is_refused() {
        let oct = r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#;
        let err = JwkKeys::parse(oct).unwrap_err();
        assert!(err.contains("HMAC tokens are never accepted"), "{err}");
        let enc = r#"{"keys":[{"kty":"RSA","kid":"e","use":"enc","n":"AQAB","e":"AQAB"}]}"#;
        assert!(JwkKeys::parse(enc).unwrap_err().contains("not \"sig\""));
        assert!(JwkKeys::parse(r#"{"keys":[]}"#).is_err());
        assert!(JwkKeys::parse(r#"{"kty":"RSA"}"#).is_err());
        assert!(JwkKeys::parse("not json").is_err());
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        let c = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert_eq!(
            scopes_of(&c(serde_json::json!({"scope": "a  b"}))),
            ["a", "b"]
        );
        assert_eq!(
            scopes_of(&c(serde_json::json!({"scp": ["a", "b"]}))),
            ["a", "b"]
        );
        assert_eq!(scopes_of(&c(serde_json::json!({"scp": "a b"}))), ["a", "b"]);
        assert!(scopes_of(&c(serde_json::json!({"scope": 3}))).is_empty());
    }
}
