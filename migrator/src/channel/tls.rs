//! TLS 1.3 for the channel (rustls, ring's AES-GCM), both ends always
//! presenting a certificate. Two ways to trust the other end:
//!
//! - **token**: each process makes a throwaway self-signed certificate;
//!   the handshake is checked for a valid signature by that certificate's
//!   key, but the certificate itself proves nothing. Who is on the other
//!   end is proven next, inside the session, by the token proofs bound to
//!   its exporter (see `token`).
//! - **certificates**: `--cert`, `--key`, `--ca`. The agent accepts only
//!   client certificates issued by the CA; the source accepts only an agent
//!   certificate from the CA that names the host or address it dialled.

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::token::Token;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("making a throwaway certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// How this host proves itself and recognises the other.
pub enum Credentials {
    Token(Token),
    Certificates {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
    },
}

impl Credentials {
    /// `--cert`, `--key`, `--ca` (PEM files).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsSetupError> {
        let file_error = |what: &'static str, path: &Path, reason: String| TlsSetupError::File {
            what,
            path: path.display().to_string(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(Iterator::collect)
            .map_err(|e| file_error("--cert", cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(file_error(
                "--cert",
                cert,
                "no PEM certificate in it".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| file_error("--key", key, format!("{e} (a PEM private key)")))?;
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(Iterator::collect)
            .map_err(|e| file_error("--ca", ca, e.to_string()))?;
        for certificate in cas {
            roots
                .add(certificate)
                .map_err(|e| file_error("--ca", ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(file_error("--ca", ca, "no PEM certificate in it".into()));
        }
        Ok(Self::Certificates {
            chain,
            key,
            roots: Arc::new(roots),
        })
    }

    pub const fn token(&self) -> Option<&Token> {
        match self {
            Self::Token(token) => Some(token),
            Self::Certificates { .. } => None,
        }
    }

    /// What this host shows: the configured chain, or a throwaway one.
    fn identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
        match self {
            Self::Certificates { chain, key, .. } => Ok((chain.clone(), key.clone_key())),
            Self::Token(_) => {
                let generated = rcgen::generate_simple_self_signed(vec!["migrator".to_owned()])
                    .map_err(|e| TlsSetupError::Generate(e.to_string()))?;
                let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
                    .map_err(|e| TlsSetupError::Generate(e.to_string()))?;
                Ok((vec![generated.cert.der().clone()], key))
            }
        }
    }
}

/// ring's TLS 1.3 suites, AES-128-GCM first: 128-bit keys are plenty
/// for a session that lives seconds, and its 10 rounds (against 14) show
/// in the stream's throughput.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The source's side.
pub fn client_config(credentials: &Credentials) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let builder = match credentials {
        Credentials::Certificates { roots, .. } => builder.with_root_certificates(roots.clone()),
        Credentials::Token(_) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SignedByItsKey {
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let (chain, key) = credentials.identity()?;
    let config = builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The agent's side.
pub fn server_config(credentials: &Credentials) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let verifier: Arc<dyn ClientCertVerifier> = match credentials {
        Credentials::Certificates { roots, .. } => {
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| TlsSetupError::Config(e.to_string()))?
        }
        Credentials::Token(_) => Arc::new(SignedByItsKey {
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let (chain, key) = credentials.identity()?;
    let config = builder
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Token mode's verifier, both directions: any certificate, as long as the
/// handshake is signed by its key (so the session keys belong to whoever
/// holds it). Identity is proven by the token inside the session.
#[derive(Debug)]
struct SignedByItsKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SignedByItsKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never negotiated (TLS13 only).
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SignedByItsKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}
