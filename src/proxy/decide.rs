//! Forward auth's answer (DESIGN.md §10): the decision the proxy would make on a request a
//! front proxy describes, without forwarding anything.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Empty, Full};

use crate::auth::{Identity, Verified};
use crate::conn::ConnInfo;
use crate::error::Reject;

use super::{Exchange, Proxy, ResponseBody};

/// The credential's fingerprint on an allowed answer (a key's or a token's; empty otherwise).
pub static CREDENTIAL_FP: HeaderName = HeaderName::from_static("x-credential-fingerprint");

impl Proxy {
    /// Answer for `req`, a request a front proxy describes (never forwarded): 200 with the
    /// identity header and the credential's fingerprint, both always present (empty for an
    /// anonymous caller: a front proxy that copies them must never keep a client's own copy),
    /// or the refusal the proxy itself would send, in the MCP profile on the MCP path.
    /// `refused`: the description itself was unusable. Logged and counted like a proxied
    /// request. Fails closed: whatever the proxy would refuse is refused.
    pub async fn decide(
        &self,
        req: Request<Empty<Bytes>>,
        conn: &ConnInfo,
        refused: Option<Reject>,
    ) -> Response<ResponseBody> {
        let mut ex = Exchange::start(self, &req, conn);
        let decided = match refused {
            Some(reject) => Err(reject),
            None => self.judge_described(&req, conn, &mut ex).await,
        };
        let mut resp = match decided {
            Ok(verified) => {
                ex.record.outcome = "ok";
                allowed(&self.config.auth.identity_header, &verified)
            }
            Err(reject) => self.refusal(&reject, &mut ex),
        };
        self.judgment_headers(resp.headers_mut(), &ex);
        self.finish_local(resp, ex)
    }

    /// What [`Proxy::admit`] checks of a described request (method, path, network), then
    /// [`Proxy::judge`].
    async fn judge_described(
        &self,
        req: &Request<Empty<Bytes>>,
        conn: &ConnInfo,
        ex: &mut Exchange,
    ) -> Result<Verified, Reject> {
        if req.method() == Method::CONNECT {
            return Err(Reject::BadRequest);
        }
        let path = crate::path::normalize(req.uri().path()).map_err(|_| Reject::BadRequest)?;
        ex.record.path.clone_from(&path);
        if !self.config.server.net.allows(ex.client) {
            return Err(Reject::ForbiddenNetwork);
        }
        self.judge(req.method(), &path, req.headers(), conn, ex)
            .await
    }
}

/// 200, with who the caller is for the front proxy to copy toward its backend.
fn allowed(identity_header: &HeaderName, verified: &Verified) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    let empty = HeaderValue::from_static("");
    let identity = &verified.identity;
    h.insert(
        identity_header.clone(),
        identity.header_value().unwrap_or_else(|| empty.clone()),
    );
    let fp = match identity {
        Identity::Key(k) => HeaderValue::from_str(&k.fingerprint).ok(),
        Identity::Token(t) => HeaderValue::from_str(&t.fingerprint).ok(),
        Identity::User(_) | Identity::ClientCert(_) | Identity::Anonymous => None,
    };
    h.insert(CREDENTIAL_FP.clone(), fp.unwrap_or(empty));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
