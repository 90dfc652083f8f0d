//! Certificates made at test time: a CA, server and client leaves, and a TLS client.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::support::full;

pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Leaf {
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { ca }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        client: bool,
        not_after: Option<(i32, u8, u8)>,
    ) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(y - 1, m, d);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.issue("localhost", &["localhost", "127.0.0.1"], false, None)
    }

    /// A server certificate for `name` only.
    pub fn server_for(&self, name: &str) -> Leaf {
        self.issue(name, &[name], false, None)
    }

    pub fn server_until(&self, y: i32, m: u8, d: u8) -> Leaf {
        self.issue(
            "localhost",
            &["localhost", "127.0.0.1"],
            false,
            Some((y, m, d)),
        )
    }

    pub fn client(&self, cn: &str) -> Leaf {
        self.issue(cn, &[], true, None)
    }
}

/// How a test client connects.
pub struct ClientOpts<'a> {
    pub ca: &'a str,
    pub versions: &'static [&'static rustls::SupportedProtocolVersion],
    pub alpn: &'static [&'static [u8]],
    pub client_cert: Option<&'a Leaf>,
}

impl<'a> ClientOpts<'a> {
    pub fn new(ca: &'a str) -> ClientOpts<'a> {
        ClientOpts {
            ca,
            versions: rustls::ALL_VERSIONS,
            alpn: &[b"http/1.1"],
            client_cert: None,
        }
    }
}

pub struct TlsReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
    pub server_cert: CertificateDer<'static>,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Open a TLS connection (SNI "localhost").
pub async fn connect(
    addr: SocketAddr,
    opts: &ClientOpts<'_>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(opts.ca.as_bytes())?)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(opts.versions)?
        .with_root_certificates(roots);
    let mut config = match opts.client_cert {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder.with_client_auth_cert(
            vec![leaf.der()],
            PrivateKeyDer::from_pem_slice(leaf.key.as_bytes())?,
        )?,
    };
    config.alpn_protocols = opts.alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    Ok(connector
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?)
}

/// One GET over a fresh TLS connection, HTTP/2 when ALPN picks h2.
pub async fn tls_get(
    addr: SocketAddr,
    opts: &ClientOpts<'_>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TlsReply, BoxError> {
    let stream = connect(addr, opts).await?;
    let (_, session) = stream.get_ref();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let version = session.protocol_version();
    let server_cert = session.peer_certificates().unwrap()[0].clone().into_owned();
    let mut req = http::Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let io = TokioIo::new(stream);
    let resp = if alpn.as_deref() == Some(b"h2") {
        let req = req.uri(format!("https://localhost{path}")).body(full(""))?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    } else {
        let req = req.header("host", "localhost").body(full(""))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send.send_request(req).await?
    };
    let (parts, body) = resp.into_parts();
    Ok(TlsReply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
        alpn,
        version,
        server_cert,
    })
}
