//! TLS toward a server, as its DatabaseServer's `sslMode` says.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, DigitallySignedStruct, SignatureScheme};

use super::{ServerError, ServerWriter};
use crate::protocol::ProtocolError;
use crate::routing::TenantRoute;

/// TLS toward a server, as its DatabaseServer's `sslMode` says (libpq semantics: `Require`
/// encrypts without verifying the certificate; `Prefer` encrypts when the server offers it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub enum UpstreamTls {
    Disable,
    #[default]
    Prefer,
    Require,
}

/// SSLRequest first unless TLS is disabled; then the two halves, encrypted or not.
pub(super) async fn negotiate(
    mut stream: TcpStream,
    route: &TenantRoute,
) -> Result<(Box<dyn AsyncRead + Unpin + Send>, ServerWriter), ServerError> {
    if route.upstream_tls != UpstreamTls::Disable {
        let mut request = Vec::with_capacity(8);
        request.extend_from_slice(&8i32.to_be_bytes());
        request.extend_from_slice(&crate::protocol::startup::SSL_REQUEST.to_be_bytes());
        stream
            .write_all(&request)
            .await
            .map_err(ProtocolError::from)?;
        let mut answer = [0u8; 1];
        stream
            .read_exact(&mut answer)
            .await
            .map_err(ProtocolError::from)?;
        match answer[0] {
            b'S' => {
                let connector = tokio_rustls::TlsConnector::from(encrypt_only_config());
                let name = ServerName::try_from(route.host.clone())
                    .map_err(|e| ServerError::Tls(std::io::Error::other(e)))?;
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(ServerError::Tls)?;
                let (r, w) = tokio::io::split(tls);
                return Ok((Box::new(r), Box::new(w)));
            }
            _ if route.upstream_tls == UpstreamTls::Require => return Err(ServerError::TlsRefused),
            _ => {}
        }
    }
    let (r, w) = stream.into_split();
    Ok((Box::new(r), Box::new(w)))
}

fn encrypt_only_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// libpq's `sslmode=require`: the channel is encrypted and the handshake signatures are checked,
/// but the certificate chain is not verified.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
