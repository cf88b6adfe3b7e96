//! HTTPS for the gateway when `[gateway] tls_cert_file` and `tls_key_file` are set: rustls
//! (ring), HTTP/1.1 and HTTP/2, the same routes and limits as plain HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tower::ServiceExt as _;
use tracing::debug;

use crate::GatewayError;

/// A client gets this long to finish the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The server's TLS configuration from the PEM files.
///
/// # Errors
/// Which file is unreadable or holds no certificate or key.
pub fn config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<ServerConfig>, GatewayError> {
    let bad = |what: String| GatewayError::Config(what);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| {
            bad(format!(
                "[gateway] tls_cert_file {}: {e}",
                cert_file.display()
            ))
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            bad(format!(
                "[gateway] tls_cert_file {}: {e}",
                cert_file.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(bad(format!(
            "[gateway] tls_cert_file {} holds no certificate",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        bad(format!(
            "[gateway] tls_key_file {}: {e}",
            key_file.display()
        ))
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(format!("[gateway] TLS certificate and key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `app` over TLS until `shutdown`; connections in flight finish on their own.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: Arc<ServerConfig>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let acceptor = TlsAcceptor::from(cfg);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "Accept failed.");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                // A client that is not speaking TLS, or too slowly: drop it.
                _ => return,
            };
            // The peer's address, as the plain server gives it (the auth limiter uses it).
            let svc = app.map_request(move |mut req: axum::extract::Request<_>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc))
                .await;
        });
    }
}
