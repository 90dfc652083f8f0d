//! The request as the backend gets it (DESIGN.md §5): the pipeline's rewrite stage.

use http::request::Parts;
use http::{header, HeaderName, HeaderValue, Version};

use crate::auth::Verified;
use crate::config::{HostHeader, UpstreamProtocol};
use crate::conn::ConnInfo;
use crate::error::Reject;
use crate::headers::{self, X_REQUEST_ID};

use super::tunnel::{self, Upgrade};
use super::{Exchange, Proxy};

impl Proxy {
    /// The request as the backend gets it (DESIGN.md §5): hop-by-hop and spoofable headers
    /// and credentials removed, forwarding headers, identity, request id and Host set, the
    /// version the upstream speaks. The URI (and with `host_header = "upstream"` the Host) is
    /// the instance's, set when it is sent.
    pub(super) fn rewrite(
        &self,
        parts: &mut Parts,
        verified: &Verified,
        upgrade: Option<Upgrade>,
        conn: &ConnInfo,
        ex: &Exchange,
    ) -> Result<(), Reject> {
        let (identity, carrier) = (&verified.identity, verified.carrier.as_ref());
        let up = &self.upstream.config;
        let client_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let h = &mut parts.headers;
        // gRPC over h2c needs `TE: trailers`, the one TE value that may cross an HTTP/2 hop.
        let keep_te_trailers =
            up.protocol == UpstreamProtocol::Http2 && headers::te_has_trailers(h);
        headers::strip_hop_by_hop(h);
        if keep_te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(how) = upgrade {
            if up.protocol == UpstreamProtocol::Http2 {
                return Err(Reject::UpgradeUnsupported);
            }
            tunnel::to_http1_handshake(how, &mut parts.method, &mut parts.extensions, h);
        }
        if parts.version == Version::HTTP_2 && up.protocol == UpstreamProtocol::Http1 {
            headers::join_cookies(h);
        }
        let forwarded_chain = self.config.server.net.incoming_chain(conn.peer.ip(), h);
        headers::remove_all(h, &self.request_strip);
        headers::remove_underscored(h);
        if up.pass_credentials {
            self.keep_only_verified_credential(h, carrier);
        }
        headers::set_forwarded(
            h,
            &headers::Forwarded {
                client_ip: ex.client,
                peer: crate::netpolicy::canonical(conn.peer.ip()),
                peer_value: &conn.peer_value,
                chain: forwarded_chain.as_deref(),
                proto: self.proto,
                client_host: client_host.as_ref(),
            },
        );
        if let Some(v) = identity.header_value() {
            h.insert(self.config.auth.identity_header.clone(), v);
        }
        h.insert(X_REQUEST_ID.clone(), ex.record.request_id.value().clone());
        // With host_header = "upstream", the instance's authority is set as the request is
        // sent (it depends on the instance, as the URI does: Upstream::send).
        if let (HostHeader::Preserve, Some(host)) = (up.host_header, client_host) {
            h.insert(header::HOST, host);
        }
        parts.version = match up.protocol {
            UpstreamProtocol::Http1 => Version::HTTP_11,
            UpstreamProtocol::Http2 => Version::HTTP_2,
        };
        Ok(())
    }

    /// With `pass_credentials`, the backend gets the credential that was verified and no other:
    /// the header authentication read it from (`carrier`), none at all for an anonymous or
    /// certificate identity.
    fn keep_only_verified_credential(&self, h: &mut http::HeaderMap, carrier: Option<&HeaderName>) {
        let names = &self.config.auth.api_key_headers;
        for name in names.iter().chain([&header::AUTHORIZATION]) {
            if carrier != Some(name) {
                h.remove(name);
            }
        }
    }
}
