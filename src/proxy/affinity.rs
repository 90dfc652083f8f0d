//! MCP session affinity in the pipeline (`[upstream] mcp_session_affinity`, DESIGN.md §11):
//! a sealed `Mcp-Session-Id` is opened on the way in (the request goes to the instance that
//! issued the session, with the backend's own id) and the id an instance issues is sealed on
//! the way out. The sealing itself is `upstream::affinity`.

use http::{HeaderValue, Response};
use hyper::body::Incoming;

use crate::error::Reject;
use crate::headers;
use crate::mcp::MCP_SESSION_ID;
use crate::upstream::affinity::{Sealer, Unsealed};
use crate::upstream::Route;

use super::{Exchange, Proxy};

impl Proxy {
    /// With MCP session affinity, where a request carrying an `Mcp-Session-Id` goes: the
    /// sealed id is opened for the caller and the instance that issued it, and the original id
    /// goes to that instance. Fails closed: an id that does not open for this caller (forged,
    /// damaged, another key's, another identity's) is answered 404, MCP's answer for an
    /// unknown session, and the backend is not asked.
    pub(super) fn session_route(
        &self,
        h: &mut http::HeaderMap,
        owner: &str,
        ex: &Exchange,
    ) -> Result<Route, Reject> {
        let Some(sealer) = &self.upstream.config.session_affinity else {
            return Ok(Route::Balanced);
        };
        let Some(id) = headers::single(h, &MCP_SESSION_ID).map_err(|_| Reject::BadRequest)? else {
            return Ok(Route::Balanced);
        };
        let opened = id
            .to_str()
            .map_err(|_| Unsealed::Malformed)
            .and_then(|id| sealer.open(id, owner));
        match opened {
            Ok((instance, original)) => {
                let original =
                    HeaderValue::from_bytes(&original).map_err(|_| Reject::SessionNotFound)?;
                h.insert(MCP_SESSION_ID.clone(), original);
                Ok(Route::Pinned(instance))
            }
            Err(why) => {
                tracing::warn!(event = "mcp_session_refused", request_id = %ex.record.request_id, identity = owner, reason = ?why, "an MCP session id that does not open for this caller: 404");
                Err(Reject::SessionNotFound)
            }
        }
    }
}

/// Whom an anonymous caller's sessions are sealed to.
pub(super) const ANONYMOUS_OWNER: &str = "anonymous";

/// With MCP session affinity, an `Mcp-Session-Id` an instance issued is handed to the client
/// sealed with that instance and the caller. Fails closed: an id too long to seal (over 256
/// bytes) cannot be routed back, so the answer is refused (502).
pub(super) fn seal_session(
    sealer: &Sealer,
    instance: usize,
    owner: &str,
    resp: &mut Response<Incoming>,
    ex: &Exchange,
) -> Result<(), Reject> {
    let h = resp.headers_mut();
    let Some(original) = h.get(&MCP_SESSION_ID) else {
        return Ok(());
    };
    let sealed = sealer
        .seal(instance, owner, original.as_bytes())
        .and_then(|s| HeaderValue::from_str(&s).ok());
    match sealed {
        Some(v) => {
            h.insert(MCP_SESSION_ID.clone(), v);
            Ok(())
        }
        None => {
            tracing::warn!(request_id = %ex.record.request_id, len = original.len(), "the backend issued an MCP session id longer than 256 bytes, which affinity cannot seal: 502");
            Err(Reject::UpstreamUnavailable)
        }
    }
}
