//! Authentication: find the credential a request carries and check it.
//!
//! Pure: no I/O, no shared state beyond the snapshot it is handed. Fails closed: anything that
//! is not a well-formed credential for an enabled, unexpired key is a [`Reject`].

pub mod api_key;
pub mod basic;
pub mod htpasswd;

use std::sync::Arc;
use std::time::SystemTime;

use http::{header, HeaderMap, HeaderName};

use crate::error::Reject;
use api_key::{ApiKey, KeySet};

/// Who a request is, once authenticated.
#[derive(Debug, Clone)]
pub enum Identity {
    Key(Arc<ApiKey>),
    /// An htpasswd user, by name.
    User(Arc<str>),
    /// A verified TLS client certificate (`client_cert_identity`), by its CN or first SAN.
    ClientCert(Arc<str>),
    /// A `public_paths` request, or any request under `anonymous = true` without a credential.
    Anonymous,
}

impl Identity {
    /// The name the backend sees in the identity header, and logs show.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Key(k) => Some(&k.name),
            Identity::User(u) | Identity::ClientCert(u) => Some(u),
            Identity::Anonymous => None,
        }
    }

    /// The name as the identity header carries it. Names are validated at load time to be
    /// header-safe; a key's value is made once, when the keys file is loaded.
    pub fn header_value(&self) -> Option<http::HeaderValue> {
        match self {
            Identity::Key(k) => k.name_value.clone(),
            Identity::User(u) | Identity::ClientCert(u) => http::HeaderValue::from_str(u).ok(),
            Identity::Anonymous => None,
        }
    }

    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Identity::Key(k) => Some(&k.fingerprint),
            Identity::User(_) | Identity::ClientCert(_) | Identity::Anonymous => None,
        }
    }
}

/// A credential as the request presents it.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'h> {
    ApiKey(&'h str),
    Basic { user: String, password: Vec<u8> },
}

/// What to accept, and how.
pub struct Authenticator<'a> {
    pub keys: &'a KeySet,
    pub api_key_headers: &'a [HeaderName],
    pub anonymous: bool,
    /// HTTP Basic is accepted (an htpasswd file is configured): the realm to challenge with.
    pub basic_realm: Option<&'a Arc<str>>,
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

impl Authenticator<'_> {
    /// The credential a request presents, from the first configured header that is present.
    /// `Ok(None)`: no credential at all.
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<Option<Credential<'h>>, Reject> {
        for name in self.api_key_headers {
            let mut values = headers.get_all(name).iter();
            let Some(value) = values.next() else { continue };
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
            return Ok(Some(credential));
        }
        // `Authorization: Basic` is looked for even when "authorization" is not among the API
        // key headers (then a Bearer there is a refused scheme).
        if self.basic_realm.is_some() && !self.api_key_headers.contains(&header::AUTHORIZATION) {
            if let Some(v) = headers.get(header::AUTHORIZATION) {
                let v = v.to_str().map_err(|_| Reject::MalformedCredentials)?.trim();
                return self.authorization(v, false).map(Some);
            }
        }
        Ok(None)
    }

    /// An `Authorization` value: `Bearer <key>` (when `bearer` is accepted there) or, with an
    /// htpasswd file, `Basic <base64>`. Any other scheme is refused.
    fn authorization<'h>(&self, value: &'h str, bearer: bool) -> Result<Credential<'h>, Reject> {
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.is_empty() {
            return Err(Reject::MalformedCredentials);
        }
        if scheme.eq_ignore_ascii_case("basic") && self.basic_realm.is_some() {
            return parse_basic(rest.trim());
        }
        if bearer && scheme.eq_ignore_ascii_case("bearer") {
            return Ok(Credential::ApiKey(rest.trim()));
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
        };
        match a.extract(&map(headers))? {
            Some(Credential::ApiKey(token)) => a.check_key(token, SystemTime::now()),
            Some(Credential::Basic { .. }) => panic!("Basic without htpasswd"),
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
