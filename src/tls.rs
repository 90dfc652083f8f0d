//! TLS termination: certificate loading, the swappable certificate resolver, client
//! certificates (mTLS), and the rustls server configuration.
//!
//! PEM is read with rustls-pki-types' `PemObject` (the maintained successor of the archived
//! rustls-pemfile). Only TLS 1.2 and 1.3 with rustls' default (safe) cipher suites; ALPN offers
//! `h2` and `http/1.1`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use x509_cert::der::Decode;

/// Certificates expiring sooner than this are warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Whether client certificates are asked for.
#[derive(serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a certificate signed by `client_ca` cannot connect.
    #[default]
    Required,
    /// A certificate is verified when presented; clients without one connect as usual.
    Optional,
}

/// `[tls]`, validated.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A loaded certificate chain and key, with what operators need to know about it.
#[derive(Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub subject: String,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("subject", &self.subject)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish()
    }
}

/// Load and check a certificate chain and its private key (PKCS#8, PKCS#1 or SEC1 PEM).
/// Errors name the file and say what is wrong; a key that does not belong to the
/// certificate is refused.
pub fn load_cert(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: malformed PEM certificate: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE block found; expected the PEM certificate chain, leaf first",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM expected): {e}",
            key_path.display()
        )
    })?;
    let leaf = x509_cert::Certificate::from_der(&chain[0]).map_err(|e| {
        format!(
            "{}: the first certificate does not parse: {e}",
            cert_path.display()
        )
    })?;
    for (i, c) in chain.iter().enumerate().skip(1) {
        x509_cert::Certificate::from_der(c).map_err(|e| {
            format!(
                "{}: certificate {} of the chain does not parse: {e}",
                cert_path.display(),
                i + 1
            )
        })?;
    }
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        format!(
            "{} does not belong to the certificate in {}; use the key the certificate was issued for",
            key_path.display(),
            cert_path.display()
        )
    })?;
    let tbs = leaf.tbs_certificate();
    Ok(LoadedCert {
        key: Arc::new(certified),
        not_after: tbs.validity().not_after.to_system_time(),
        subject: tbs.subject().to_string(),
    })
}

/// A warning when the certificate expires within [`EXPIRY_WARNING`] (or already has).
pub fn expiry_warning(cert: &LoadedCert, path: &Path, now: SystemTime) -> Option<String> {
    let when = humantime::format_rfc3339_seconds(cert.not_after);
    match cert.not_after.duration_since(now) {
        Err(_) => Some(format!(
            "{}: the certificate expired at {when}",
            path.display()
        )),
        Ok(left) if left < EXPIRY_WARNING => Some(format!(
            "{}: the certificate expires at {when}, in {} days",
            path.display(),
            left.as_secs() / 86_400
        )),
        Ok(_) => None,
    }
}

/// The identity a verified client certificate stands for: its subject CN, else its first
/// DNS, email or URI SAN.
pub fn client_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let cert = x509_cert::Certificate::from_der(cert).ok()?;
    let tbs = cert.tbs_certificate();
    if let Ok(Some(cn)) = tbs.subject().common_name() {
        let cn = cn.value().into_owned();
        if !cn.is_empty() {
            return Some(cn);
        }
    }
    let (_, san) = tbs.get_extension::<SubjectAltName>().ok()??;
    san.0.iter().find_map(|name| match name {
        GeneralName::DnsName(n) => Some(n.to_string()),
        GeneralName::Rfc822Name(n) => Some(n.to_string()),
        GeneralName::UniformResourceIdentifier(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The certificate served to new handshakes, swappable while connections stay up.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<LoadedCert>,
    /// Reloads that swapped in a new certificate.
    pub reloads_ok: AtomicU64,
    /// Reloads that failed and kept the previous certificate.
    pub reloads_failed: AtomicU64,
    /// When the served certificate was loaded (Unix seconds).
    loaded_at: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl CertResolver {
    pub fn new(cert: LoadedCert) -> CertResolver {
        CertResolver {
            current: ArcSwap::from_pointee(cert),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            loaded_at: AtomicU64::new(unix_now()),
        }
    }

    pub fn swap(&self, cert: LoadedCert) {
        self.current.store(Arc::new(cert));
        self.loaded_at.store(unix_now(), Ordering::Relaxed);
    }

    /// When the served certificate was loaded (start-up or the last good reload).
    pub fn last_success(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.loaded_at.load(Ordering::Relaxed))
    }

    pub fn current(&self) -> Arc<LoadedCert> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One certificate whatever the SNI: a sidecar serves one name (or a wildcard).
        Some(self.current.load().key.clone())
    }
}

/// Read the CA bundle that client certificates must chain to.
pub fn load_client_roots(path: &Path) -> Result<RootCertStore, String> {
    load_roots(path, "client CA")
}

/// Read a PEM CA bundle: every certificate in it becomes a trust anchor.
pub fn load_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read the {what}: {e}", path.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("{}: malformed PEM certificate: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CERTIFICATE block found", path.display()));
    }
    Ok(roots)
}

/// The rustls server configuration: TLS 1.2 and 1.3, ALPN h2 and http/1.1, the swappable
/// certificate, and client certificate verification when `client_ca` is set.
pub fn server_config(cfg: &TlsConfig, resolver: Arc<CertResolver>) -> Result<ServerConfig, String> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = Arc::new(load_client_roots(ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = match cfg.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The trust anchors for an `https://` upstream: `upstream.ca` when set, otherwise the
/// system's CA store (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
pub fn upstream_roots(ca: Option<&Path>) -> Result<RootCertStore, String> {
    if let Some(path) = ca {
        return load_roots(path, "upstream CA");
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "no system CA certificates found{why}; install the ca-certificates package or set upstream.ca = \"backend-ca.crt\""
        ));
    }
    Ok(roots)
}

/// The rustls client configuration for an `https://` upstream: TLS 1.2 and 1.3, the backend's
/// certificate verified against `roots` for the URL's host name (or IP address).
pub fn upstream_client_config(roots: Arc<RootCertStore>) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
