//! Authentication: who a request is. [`Auth::authenticate`] refuses a banned client before
//! looking at anything, then finds the one credential the request carries and checks it
//! against the current [`Snapshot`] (API key, htpasswd user, client certificate); failures
//! of presented credentials count toward a ban.
//!
//! No file I/O and no watcher: the reloader swaps the snapshot this reads. Fails closed:
//! anything that is not a well-formed credential for an enabled, unexpired key or a verified
//! user is a [`Reject`].

pub mod api_key;
pub mod basic;
pub mod htpasswd;
pub mod jwks;
pub mod jwt;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderName};

use crate::ban::Bans;
use crate::error::{KeyRefusal, Reject};
use api_key::{ApiKey, KeySet};
use basic::{BasicVerifier, Verdict};
use htpasswd::Htpasswd;
use jwks::Jwks;
use jwt::{JwtConfig, TokenIdentity};

/// `[auth]`, validated, with the keys and htpasswd files it names loaded.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub keys_file: Option<std::path::PathBuf>,
    /// The keys loaded from `keys_file` at validation time.
    pub keys: KeySet,
    pub htpasswd_file: Option<std::path::PathBuf>,
    /// The users loaded from `htpasswd_file` at validation time.
    pub htpasswd: Option<Arc<Htpasswd>>,
    pub htpasswd_plaintext: bool,
    /// How long a successful slow-hash verification is remembered.
    pub htpasswd_cache_ttl: std::time::Duration,
    /// Remembered verifications at most.
    pub htpasswd_cache_entries: usize,
    /// Lower-case header names that may carry an API key, in the order they are tried.
    pub api_key_headers: Vec<http::HeaderName>,
    pub realm: String,
    pub identity_header: http::HeaderName,
    pub public_paths: Vec<crate::authz::PathPattern>,
    pub anonymous: bool,
    /// With mTLS, a verified client certificate is a credential (its CN or first SAN).
    pub client_cert_identity: bool,
    /// `[auth.jwt]`: JWT access tokens from an OAuth 2.1 / OIDC issuer.
    pub jwt: Option<JwtConfig>,
}

/// The credentials in force: everything a request reads that a reload may replace, built
/// whole before it is swapped in. A request loads one snapshot once and uses it to the end.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub keys: KeySet,
    pub htpasswd: Option<Arc<Htpasswd>>,
    /// 1 at start, one more for every swap.
    pub generation: u64,
}

impl Snapshot {
    pub fn from_config(config: &AuthConfig) -> Snapshot {
        Snapshot {
            keys: config.keys.clone(),
            htpasswd: config.htpasswd.clone(),
            generation: 1,
        }
    }
}

/// An identity with what it was verified against, so that a stream that starts later can be
/// checked against the credentials in force by then.
pub struct Verified {
    pub identity: Identity,
    /// The snapshot generation the credential was checked in.
    generation: u64,
    /// For an htpasswd user: the file it was verified against.
    users: Option<Arc<Htpasswd>>,
    /// The header the verified credential came in (a key or a Basic user's; `None` for a
    /// certificate or no credential).
    pub carrier: Option<HeaderName>,
}

impl Verified {
    /// A request no credential was asked of (`public_paths`).
    pub fn public() -> Verified {
        Verified {
            identity: Identity::Anonymous,
            generation: 0,
            users: None,
            carrier: None,
        }
    }
}

/// Authentication's long-lived state: the credentials in force (swapped by the reloader), the
/// bans, and the Basic verification cache.
pub struct Auth {
    pub credentials: Arc<ArcSwap<Snapshot>>,
    pub bans: Arc<Bans>,
    pub basic: BasicVerifier,
    /// JWT access tokens and the issuer's key set, with `[auth.jwt]`.
    pub jwt: Option<Arc<Jwks>>,
    api_key_headers: Vec<HeaderName>,
    anonymous: bool,
    client_cert_identity: bool,
    realm: Arc<str>,
}

impl Auth {
    pub fn new(config: &AuthConfig, bans: Arc<Bans>) -> Auth {
        Auth {
            credentials: Arc::new(ArcSwap::from_pointee(Snapshot::from_config(config))),
            bans,
            basic: BasicVerifier::new(config.htpasswd_cache_ttl, config.htpasswd_cache_entries),
            jwt: config.jwt.clone().map(|j| Arc::new(Jwks::new(j))),
            api_key_headers: config.api_key_headers.clone(),
            anonymous: config.anonymous,
            client_cert_identity: config.client_cert_identity,
            realm: config.realm.as_str().into(),
        }
    }

    /// Who the request is. A banned client is refused before any credential is looked at
    /// (no hash is computed for it); presented credentials that fail count toward a ban.
    /// `client_cert`: the verified client certificate's identity (mTLS), if any. `ban_subject`:
    /// the address bans are kept for, `None` when the client is a trusted proxy (which stands
    /// for everyone behind it, so it is never banned).
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client_cert: Option<&Arc<str>>,
        client: IpAddr,
        ban_subject: Option<IpAddr>,
    ) -> Result<Verified, Reject> {
        let now = Instant::now();
        if let Some(ip) = ban_subject {
            if let Some(left) = self.bans.banned_for(ip, now).await {
                return Err(Reject::Banned {
                    retry_after: left.as_secs_f64().ceil() as u64,
                });
            }
        }
        let result = self.check(headers, client_cert, client, now).await;
        if let (Err(reject), Some(ip)) = (&result, ban_subject) {
            if reject.counts_toward_ban() {
                self.bans.record_failure(ip, now).await;
            }
        }
        result
    }

    /// Whether `v`'s credential may still be used `now` under the credentials in force (a key
    /// still present, enabled and unexpired; a user still in the file with the same hash), or
    /// the refusal it earns now. Asked when a stream starts, after it is registered: a
    /// revocation that came while the backend was answering is seen here, one that comes
    /// later closes the registered stream. Fails closed: a user whose entry cannot be
    /// compared is taken as changed.
    pub fn still_valid(&self, v: &Verified, now: SystemTime) -> Result<(), Reject> {
        let current = self.credentials.load();
        match &v.identity {
            Identity::Key(k) => match current.keys.get(k.digest()) {
                None => Err(Reject::InvalidToken(KeyRefusal::Unknown)),
                Some(key) if !key.enabled => Err(Reject::InvalidToken(KeyRefusal::Disabled)),
                Some(key) if !key.usable(now) => Err(Reject::InvalidToken(KeyRefusal::Expired)),
                Some(_) => Ok(()),
            },
            Identity::User(name) if current.generation != v.generation => {
                let stored = |file: Option<&Arc<Htpasswd>>| {
                    file.and_then(|f| f.user(name)).map(|u| u.stored.clone())
                };
                let then = stored(v.users.as_ref());
                if then.is_some() && then == stored(current.htpasswd.as_ref()) {
                    Ok(())
                } else {
                    Err(Reject::BadPassword(self.realm.clone()))
                }
            }
            // `expires` is `exp` with the leeway, as verification judged it.
            Identity::Token(t) if now >= t.expires => {
                Err(Reject::InvalidJwt(crate::error::TokenRefusal::Expired))
            }
            Identity::User(_)
            | Identity::ClientCert(_)
            | Identity::Token(_)
            | Identity::Anonymous => Ok(()),
        }
    }

    /// One dispatch by the credential presented.
    async fn check(
        &self,
        headers: &HeaderMap,
        client_cert: Option<&Arc<str>>,
        client: IpAddr,
        now: Instant,
    ) -> Result<Verified, Reject> {
        let snapshot = self.credentials.load();
        let verified = |identity: Identity, carrier: Option<&HeaderName>| Verified {
            users: match identity {
                Identity::User(_) => snapshot.htpasswd.clone(),
                _ => None,
            },
            generation: snapshot.generation,
            carrier: carrier.cloned(),
            identity,
        };
        let auth = Authenticator {
            keys: &snapshot.keys,
            api_key_headers: &self.api_key_headers,
            anonymous: self.anonymous,
            basic_realm: snapshot.htpasswd.as_ref().map(|_| &self.realm),
            jwt: self.jwt.is_some(),
        };
        let identity = match auth.extract(headers)? {
            None => match client_cert {
                // The handshake verified the certificate against client_ca.
                Some(name) if self.client_cert_identity => Identity::ClientCert(name.clone()),
                _ => auth.without_credentials()?,
            },
            Some(Credential::ApiKey(token)) => auth.check_key(token, SystemTime::now())?,
            Some(Credential::Jwt(token)) => {
                let Some(jwks) = &self.jwt else {
                    return Err(Reject::InvalidScheme);
                };
                Identity::Token(jwks.verify(token).await?)
            }
            Some(Credential::Basic { user, password }) => {
                let Some(file) = &snapshot.htpasswd else {
                    return Err(Reject::InvalidScheme);
                };
                match self.basic.verify(file, &user, &password, client, now).await {
                    Verdict::Valid => Identity::User(user.into()),
                    Verdict::Invalid => return Err(Reject::BadPassword(self.realm.clone())),
                    Verdict::Throttled => return Err(Reject::RateLimited { retry_after: 1 }),
                }
            }
        };
        let carrier = match identity {
            Identity::Key(_) | Identity::User(_) => auth.carrier(headers),
            // A token is never passed on, even with pass_credentials (MCP authorization: a
            // server must not accept or transit tokens issued for another audience).
            Identity::ClientCert(_) | Identity::Token(_) | Identity::Anonymous => None,
        };
        Ok(verified(identity, carrier))
    }
}

/// Who a request is, once authenticated.
#[derive(Debug, Clone)]
pub enum Identity {
    Key(Arc<ApiKey>),
    /// An htpasswd user, by name.
    User(Arc<str>),
    /// A verified TLS client certificate (`client_cert_identity`), by its CN or first SAN.
    ClientCert(Arc<str>),
    /// A verified JWT access token (`[auth.jwt]`), by its identity claim.
    Token(Arc<TokenIdentity>),
    /// A `public_paths` request, or any request under `anonymous = true` without a credential.
    Anonymous,
}

impl Identity {
    /// The name the backend sees in the identity header, and logs show.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Key(k) => Some(&k.name),
            Identity::User(u) | Identity::ClientCert(u) => Some(u),
            Identity::Token(t) => Some(&t.subject),
            Identity::Anonymous => None,
        }
    }

    /// Who this is across credentials of one principal, as `kind:name` (a key by its name, so
    /// that a rotation to a new key of the same name keeps it); `None` when anonymous. What an
    /// MCP session is bound to.
    pub fn owner(&self) -> Option<String> {
        let kind = match self {
            Identity::Key(_) => "key",
            Identity::User(_) => "user",
            Identity::ClientCert(_) => "cert",
            Identity::Token(_) => "token",
            Identity::Anonymous => return None,
        };
        Some(format!("{kind}:{}", self.name()?))
    }

    /// The name as the identity header carries it. Names are validated at load time to be
    /// header-safe; a key's value is made once, when the keys file is loaded.
    pub fn header_value(&self) -> Option<http::HeaderValue> {
        match self {
            Identity::Key(k) => k.name_value.clone(),
            Identity::User(u) | Identity::ClientCert(u) => http::HeaderValue::from_str(u).ok(),
            Identity::Token(t) => t.value.clone(),
            Identity::Anonymous => None,
        }
    }

    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Identity::Key(k) => Some(&k.fingerprint),
            Identity::Token(t) => Some(&t.fingerprint),
            Identity::User(_) | Identity::ClientCert(_) | Identity::Anonymous => None,
        }
    }

    /// What stays true of this identity across reloads: what its streams are registered
    /// under and its rate limit is kept by.
    pub fn id(&self) -> CredId {
        match self {
            Identity::Key(k) => CredId::Key(*k.digest()),
            Identity::User(u) => CredId::User(u.clone()),
            Identity::ClientCert(c) => CredId::ClientCert(c.clone()),
            Identity::Token(t) => CredId::Token(t.subject.clone()),
            Identity::Anonymous => CredId::Anonymous,
        }
    }
}

/// An [`Identity`] without the key record: precise enough to revoke its streams and keep its
/// rate limit. An API key by its digest (two keys may share a name during a rotation), an
/// htpasswd user or a client certificate by name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum CredId {
    Key([u8; 32]),
    User(Arc<str>),
    ClientCert(Arc<str>),
    /// A token's identity claim: every token of one subject shares a rate limit.
    Token(Arc<str>),
    Anonymous,
}

impl fmt::Debug for CredId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never the digest itself in logs: the fingerprint's length is enough.
            CredId::Key(d) => write!(f, "Key({})", &api_key::hex(d)[..12]),
            CredId::User(u) => write!(f, "User({u})"),
            CredId::ClientCert(c) => write!(f, "ClientCert({c})"),
            CredId::Token(t) => write!(f, "Token({t})"),
            CredId::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// A credential as the request presents it.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'h> {
    ApiKey(&'h str),
    /// `Authorization: Bearer` with a JWT's shape, when `[auth.jwt]` is on.
    Jwt(&'h str),
    Basic {
        user: String,
        password: Vec<u8>,
    },
}

/// What to accept, and how.
pub struct Authenticator<'a> {
    pub keys: &'a KeySet,
    pub api_key_headers: &'a [HeaderName],
    pub anonymous: bool,
    /// HTTP Basic is accepted (an htpasswd file is configured): the realm to challenge with.
    pub basic_realm: Option<&'a Arc<str>>,
    /// JWT access tokens are accepted in `Authorization: Bearer` (`[auth.jwt]`).
    pub jwt: bool,
}

static AUTHORIZATION: HeaderName = header::AUTHORIZATION;

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

impl Authenticator<'_> {
    /// The credential a request presents, from the first configured header that is present.
    /// `Ok(None)`: no credential at all.
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<Option<Credential<'h>>, Reject> {
        let Some(name) = self.carrier(headers) else {
            return Ok(None);
        };
        if !self.api_key_headers.contains(name) {
            // `Authorization: Basic` is looked for even when "authorization" is not among the
            // API key headers (then a Bearer there is a refused scheme).
            let Some(v) = headers.get(name) else {
                return Ok(None);
            };
            let v = v.to_str().map_err(|_| Reject::MalformedCredentials)?.trim();
            return self.authorization(v, false).map(Some);
        }
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            // Two copies: which one a backend or another proxy would read is anybody's guess.
            return Err(Reject::MalformedCredentials);
        }
        let value = value
            .to_str()
            .map_err(|_| Reject::MalformedCredentials)?
            .trim();
        let credential = if name == header::AUTHORIZATION {
            self.authorization(value, true)?
        } else {
            Credential::ApiKey(value)
        };
        if matches!(credential, Credential::ApiKey(t) if !is_token(t)) {
            return Err(Reject::MalformedCredentials);
        }
        Ok(Some(credential))
    }

    /// The header a request's credential is read from: the first of `api_key_headers` it
    /// carries, else `Authorization` when HTTP Basic or JWTs are accepted. `None`: no
    /// credential.
    pub fn carrier(&self, headers: &HeaderMap) -> Option<&HeaderName> {
        self.api_key_headers
            .iter()
            .find(|n| headers.contains_key(*n))
            .or_else(|| {
                ((self.basic_realm.is_some() || self.jwt)
                    && headers.contains_key(header::AUTHORIZATION))
                .then_some(&AUTHORIZATION)
            })
    }

    /// An `Authorization` value: `Bearer <JWT>` with `[auth.jwt]` (a value with a JWT's shape
    /// is always judged as one), `Bearer <key>` (when keys are accepted there: `bearer`) or,
    /// with an htpasswd file, `Basic <base64>`. Any other scheme is refused.
    fn authorization<'h>(&self, value: &'h str, bearer: bool) -> Result<Credential<'h>, Reject> {
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.is_empty() {
            return Err(Reject::MalformedCredentials);
        }
        if scheme.eq_ignore_ascii_case("basic") && self.basic_realm.is_some() {
            return parse_basic(rest.trim());
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = rest.trim();
            if self.jwt && jwt::looks_like_jwt(token) {
                return Ok(Credential::Jwt(token));
            }
            if bearer {
                return Ok(Credential::ApiKey(token));
            }
        }
        Err(Reject::InvalidScheme)
    }

    /// What a request without any credential gets: anonymous access when configured, else a
    /// Basic challenge (htpasswd configured) or 403.
    pub fn without_credentials(&self) -> Result<Identity, Reject> {
        if self.anonymous {
            Ok(Identity::Anonymous)
        } else if let Some(realm) = self.basic_realm {
            Err(Reject::BasicRequired(realm.clone()))
        } else {
            Err(Reject::MissingCredentials)
        }
    }

    /// Check an API key.
    pub fn check_key(&self, token: &str, now: SystemTime) -> Result<Identity, Reject> {
        self.keys
            .lookup(token.as_bytes(), now)
            .map(Identity::Key)
            .map_err(Reject::InvalidToken)
    }
}

/// `user:password` from the base64 of `Authorization: Basic` (RFC 7617).
fn parse_basic(encoded: &str) -> Result<Credential<'static>, Reject> {
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| Reject::MalformedCredentials)?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or(Reject::MalformedCredentials)?;
    let user = std::str::from_utf8(&decoded[..colon])
        .map_err(|_| Reject::MalformedCredentials)?
        .to_owned();
    if user.chars().any(char::is_control) {
        return Err(Reject::MalformedCredentials);
    }
    Ok(Credential::Basic {
        user,
        password: decoded[colon + 1..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::api_key::KeyRefusal;
    use http::HeaderValue;
    use std::path::Path;

    const KEY: &str = "mas_0aPJ9Q9nUO1Ac1vJTfffXEXs9FyGLf9BzfYgZ_RaHm707wmbfHJNPQ";

    fn keys() -> KeySet {
        KeySet::parse(
            Path::new("k"),
            &format!("[[keys]]\nname = \"prod\"\napi_key = \"{KEY}\"\n"),
        )
        .unwrap()
    }

    fn auth(headers: &[(&'static str, &str)], anonymous: bool) -> Result<Identity, Reject> {
        let keys = keys();
        let names = [header::AUTHORIZATION, HeaderName::from_static("x-api-key")];
        let a = Authenticator {
            keys: &keys,
            api_key_headers: &names,
            anonymous,
            basic_realm: None,
            jwt: false,
        };
        match a.extract(&map(headers))? {
            Some(Credential::ApiKey(token)) => a.check_key(token, SystemTime::now()),
            Some(Credential::Basic { .. } | Credential::Jwt(_)) => panic!("not configured"),
            None => a.without_credentials(),
        }
    }

    fn map(headers: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn basic_credentials_are_decoded_when_htpasswd_is_configured() {
        let keys = keys();
        let realm: Arc<str> = "r".into();
        let names = [header::AUTHORIZATION, HeaderName::from_static("x-api-key")];
        let only_x = [HeaderName::from_static("x-api-key")];
        for api_key_headers in [&names[..], &only_x[..]] {
            let a = Authenticator {
                keys: &keys,
                api_key_headers,
                anonymous: false,
                basic_realm: Some(&realm),
                jwt: false,
            };
            // "alice:pa:ss" — the password may hold colons.
            let headers = map(&[("authorization", "Basic YWxpY2U6cGE6c3M=")]);
            let c = a.extract(&headers).unwrap();
            assert_eq!(
                c,
                Some(Credential::Basic {
                    user: "alice".into(),
                    password: b"pa:ss".to_vec()
                })
            );
            for bad in ["Basic", "Basic !!!", "Basic YWxpY2U="] {
                assert_eq!(
                    a.extract(&map(&[("authorization", bad)])),
                    Err(Reject::MalformedCredentials),
                    "{bad}"
                );
            }
            assert_eq!(
                a.without_credentials().unwrap_err(),
                Reject::BasicRequired(realm.clone())
            );
        }
    }

    #[test]
    fn bearer_and_x_api_key_both_authenticate() {
        let bearer = format!("Bearer {KEY}");
        assert_eq!(
            auth(&[("authorization", &bearer)], false).unwrap().name(),
            Some("prod")
        );
        let lower = format!("bearer  {KEY}");
        assert_eq!(
            auth(&[("authorization", &lower)], false).unwrap().name(),
            Some("prod")
        );
        assert_eq!(
            auth(&[("x-api-key", KEY)], false).unwrap().name(),
            Some("prod")
        );
    }

    #[test]
    fn the_table_of_refusals_holds() {
        assert_eq!(auth(&[], false).unwrap_err(), Reject::MissingCredentials);
        assert_eq!(
            auth(&[("authorization", "Bearer")], false).unwrap_err(),
            Reject::MalformedCredentials
        );
        assert_eq!(
            auth(&[("authorization", "Bearer ")], false).unwrap_err(),
            Reject::MalformedCredentials
        );
        assert_eq!(
            auth(&[("authorization", "Basic dTpw")], false).unwrap_err(),
            Reject::InvalidScheme
        );
        assert_eq!(
            auth(&[("authorization", "Digest x")], false).unwrap_err(),
            Reject::InvalidScheme
        );
        assert_eq!(
            auth(&[("x-api-key", "")], false).unwrap_err(),
            Reject::MalformedCredentials
        );
        assert_eq!(
            auth(&[("x-api-key", KEY), ("x-api-key", KEY)], false).unwrap_err(),
            Reject::MalformedCredentials
        );
        assert_eq!(
            auth(
                &[("authorization", "Bearer mas_wrong_0000000000000000")],
                false
            )
            .unwrap_err(),
            Reject::InvalidToken(KeyRefusal::Unknown)
        );
    }

    #[test]
    fn anonymous_mode_admits_requests_without_credentials_only() {
        assert!(matches!(auth(&[], true), Ok(Identity::Anonymous)));
        assert!(auth(&[("x-api-key", "mas_wrong_0000000000000000")], true).is_err());
    }
}
