//! Authentication: find the credential a request carries and check it.
//!
//! Pure: no I/O, no shared state beyond the snapshot it is handed. Fails closed: anything that
//! is not a well-formed credential for an enabled, unexpired key is a [`Reject`].

pub mod api_key;
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
    /// A `public_paths` request, or any request under `anonymous = true` without a credential.
    Anonymous,
}

impl Identity {
    /// The name the backend sees in the identity header, and logs show.
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Key(k) => Some(&k.name),
            Identity::Anonymous => None,
        }
    }

    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Identity::Key(k) => Some(&k.fingerprint),
            Identity::Anonymous => None,
        }
    }
}

/// What to accept, and how.
pub struct Authenticator<'a> {
    pub keys: &'a KeySet,
    pub api_key_headers: &'a [HeaderName],
    pub anonymous: bool,
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

impl Authenticator<'_> {
    /// The API key a request presents, from the first configured header that is present.
    /// `Ok(None)`: no credential at all.
    pub fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, Reject> {
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
            let token = if name == header::AUTHORIZATION {
                let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
                if scheme.is_empty() {
                    return Err(Reject::MalformedCredentials);
                }
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return Err(Reject::InvalidScheme);
                }
                rest.trim()
            } else {
                value
            };
            if !is_token(token) {
                return Err(Reject::MalformedCredentials);
            }
            return Ok(Some(token));
        }
        Ok(None)
    }

    /// Authenticate a request by its headers.
    pub fn authenticate(&self, headers: &HeaderMap, now: SystemTime) -> Result<Identity, Reject> {
        match self.extract(headers)? {
            Some(token) => self
                .keys
                .lookup(token.as_bytes(), now)
                .map(Identity::Key)
                .map_err(Reject::InvalidToken),
            None if self.anonymous => Ok(Identity::Anonymous),
            None => Err(Reject::MissingCredentials),
        }
    }
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
        };
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        a.authenticate(&map, SystemTime::now())
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
