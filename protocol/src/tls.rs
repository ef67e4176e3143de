//! TLS client configuration for libpq's sslmodes on rustls.
//!
//! - `require`: encrypted, server certificate not checked (unless a root certificate was named,
//!   where libpq too verifies the chain);
//! - `verify-ca`: the chain must lead to a trusted root, any host name;
//! - `verify-full`: chain and host name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Error, Result};
use crate::params::{ConnectParams, SslMode};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn default_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql").join("root.crt"))
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if path == Path::new("system") {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Config(format!("cannot read sslrootcert {}: {e}", path.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| {
            Error::Config(format!(
                "bad certificate in sslrootcert {}: {e}",
                path.display()
            ))
        })?;
        roots.add(cert).map_err(|e| {
            Error::Config(format!(
                "unusable root certificate in {}: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "sslrootcert {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// Builds the rustls configuration for `params.sslmode`; `None` when TLS is not to be used.
pub(crate) fn client_config(params: &ConnectParams) -> Result<Option<Arc<ClientConfig>>> {
    let mode = params.sslmode;
    if matches!(mode, SslMode::Disable | SslMode::Allow) {
        return Ok(None);
    }
    let provider = provider();
    let explicit_root = params.sslrootcert.clone();
    let root_path = explicit_root
        .clone()
        .or_else(default_root_cert)
        .filter(|p| p == Path::new("system") || p.exists());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, root_path) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(Error::Config(format!(
                "sslmode {mode:?} needs a root certificate: set sslrootcert (no {} found)",
                explicit_root
                    .or_else(default_root_cert)
                    .map_or("~/.postgresql/root.crt".into(), |p| p.display().to_string())
            )))
        }
        (SslMode::Prefer | SslMode::Require | SslMode::Disable | SslMode::Allow, None)
        | (SslMode::Prefer, _) => Arc::new(RelaxedVerifier {
            provider: provider.clone(),
            chain: None,
        }),
        (_, Some(root)) => {
            let roots = Arc::new(load_roots(&root)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| Error::Tls(e.to_string()))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(RelaxedVerifier {
                    provider: provider.clone(),
                    chain: Some(webpki),
                })
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&params.sslcert, &params.sslkey) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect())
                .map_err(|e| {
                    Error::Config(format!("cannot read sslcert {}: {e}", cert.display()))
                })?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Config(format!("cannot read sslkey {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(e.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(Error::Config(
                "sslcert and sslkey must be given together".into(),
            ))
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The TLS server name for a host: an IP address or a DNS name.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| Error::Config(format!("invalid TLS server name {host:?}: {e}")))
}

/// The server checks libpq makes below `verify-full`: none (`sslmode=require`/`prefer`:
/// encryption without authenticating the server) or, with `chain`, the chain to a trusted
/// root under any host name (`verify-ca`). Handshake signatures are verified either way.
#[derive(Debug)]
struct RelaxedVerifier {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for RelaxedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    // The WebPKI verifier checks signatures with the same provider's algorithms.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
