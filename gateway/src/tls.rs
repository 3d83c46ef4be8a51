//! Mutual TLS for the inter-site tunnel: rustls configurations (TLS 1.3 only) built from the
//! site PKI, and extraction of the peer's site name from its certificate.
//!
//! Both sides verify the other's chain against the site CA. The dialer additionally checks that
//! the certificate names the site it dialed (rustls does this through the server name); the
//! acceptor maps the client certificate's DNS name to a configured peer after the handshake.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::TlsFiles;

/// ALPN protocol of the gateway-to-gateway tunnel; bumped when the wire protocol changes
/// incompatibly.
/// `ferry/2`: [`Message::Fin`](crate::tunnel::protocol::Message::Fin) carries the end-to-end digest.
pub const ALPN: &[u8] = b"ferry/2";

/// Failure to build the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("key `{key}`: cannot load {path}: {message}")]
    Load {
        /// Config key naming the file (`tls.ca`, `tls.cert`, `tls.key`).
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// rustls rejected the material (e.g. key does not match the certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("CA certificate unusable for client verification: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// QUIC needs a TLS 1.3 cipher suite with an initial suite.
    #[error("QUIC TLS setup failed: {0}")]
    Quic(String),
}

/// Client and server crypto configurations for the tunnel endpoint.
pub struct TunnelTls {
    /// Used when dialing a peer.
    pub client: Arc<QuicClientConfig>,
    /// Used when a peer dials us.
    pub server: Arc<QuicServerConfig>,
}

fn load_err(key: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::Load { key, path: path.display().to_string(), message: message.to_string() }
}

fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| load_err(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_err(key, path, e))?;
    if certs.is_empty() {
        return Err(load_err(key, path, "no certificate in file"));
    }
    Ok(certs)
}

impl TunnelTls {
    /// Loads the site PKI files and builds TLS 1.3-only, mutually authenticating configurations.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in load_certs("tls.ca", &files.ca)? {
            roots.add(cert).map_err(|e| load_err("tls.ca", &files.ca, e))?;
        }
        let roots = Arc::new(roots);
        let chain = load_certs("tls.cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| load_err("tls.key", &files.key, e))?;

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN.to_vec()];

        Ok(Self {
            client: Arc::new(QuicClientConfig::try_from(client).map_err(|e| TlsError::Quic(e.to_string()))?),
            server: Arc::new(QuicServerConfig::try_from(server).map_err(|e| TlsError::Quic(e.to_string()))?),
        })
    }
}

/// The DNS names in the leaf certificate a peer presented, i.e. the site names it may claim.
pub fn peer_site_names(conn: &quinn::Connection) -> Vec<String> {
    let Some(identity) = conn.peer_identity() else { return Vec::new() };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else { return Vec::new() };
    let Some(leaf) = chain.first() else { return Vec::new() };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .collect()
}
