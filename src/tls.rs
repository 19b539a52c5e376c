//! TLS for the relay: the server certificate clients see (re-read on
//! SIGHUP without touching open sessions) and the client configuration
//! used towards the directory, by the relay and the connectors alike.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use thiserror::Error;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientTlsConfig, ServerTlsConfig};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no trusted CA certificates: {0}")]
    NoRoots(String),
    #[error("{host:?} is not a TLS server name: {reason}")]
    ServerName { host: String, reason: String },
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::File {
            what,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

fn private_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "PEM private key",
        },
        e => TlsError::File {
            what,
            path: path.to_owned(),
            message: e.to_string(),
        },
    })
}

/// The listeners' certificate, swappable while sessions run.
pub struct ServerTls {
    paths: ServerTlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub fn load(paths: &ServerTlsConfig) -> Result<ServerTls, TlsError> {
        Ok(ServerTls {
            current: RwLock::new(server_config(paths)?),
            paths: paths.clone(),
        })
    }

    /// Re-reads the certificate and key; on error the old ones stay in use.
    /// Sessions already under TLS keep the certificate they started with.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.paths)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner())))
    }
}

fn server_config(paths: &ServerTlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates("proxy.tls.cert", &paths.cert)?;
    let key = private_key("proxy.tls.key", &paths.key)?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// The TLS client configuration towards the directory.
pub fn client_config(tls: &ClientTlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = if tls.verify {
        let mut roots = RootCertStore::empty();
        match &tls.ca {
            Some(path) => {
                for cert in certificates("upstream_tls.ca", path)? {
                    roots.add(cert)?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
                    return Err(TlsError::NoRoots(format!(
                        "the system has none ({}); set upstream_tls.ca",
                        errors.join("; ")
                    )));
                }
            }
        }
        ClientConfig::builder().with_root_certificates(roots)
    } else {
        tracing::warn!(
            "upstream_tls.verify = false: the directory's certificate is NOT checked; \
             anyone on the path can read and change the traffic, passwords included. For laboratories only."
        );
        ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
    };
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => builder.with_client_auth_cert(
            certificates("upstream_tls.client_cert", cert)?,
            private_key("upstream_tls.client_key", key)?,
        )?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

pub fn connector(config: Arc<ClientConfig>) -> TlsConnector {
    TlsConnector::from(config)
}

/// The name a directory's certificate must carry: its host name or address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|e| TlsError::ServerName {
        host: host.to_owned(),
        reason: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `verify = false`: accepts any certificate, but still checks that the
/// handshake is signed by it.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
