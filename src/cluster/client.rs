//! The Kubernetes client: kube-rs's configuration (in-cluster service account, else
//! `KUBECONFIG`) and its authentication, over a TLS stack that also accepts a server whose
//! certificate *is* the CA the kubeconfig names.
//!
//! Why the stack is assembled here: test clusters and many self-managed ones (kubeadm
//! quick starts, envtest, `openssl req -x509`) serve a self-signed certificate and put that
//! same certificate in the kubeconfig as its CA. kubectl (Go) and OpenSSL accept it as a
//! one-certificate chain; webpki refuses a CA certificate as the end entity, so kube-rs's
//! default stack cannot connect. The verifier below keeps webpki's full check and, only
//! when it fails, accepts a leaf that is byte-for-byte one of the configured anchors and is
//! valid for the server name: a pin of exactly what the kubeconfig trusts, nothing wider.
//! Signatures over the handshake are still verified with the leaf's key. And how a failed
//! call reads (`classify`), for the store and for `login`'s one write alike.

use super::ClusterError;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::ConfigExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;

/// Builds the client for `config`, each connection attempt bounded by `connect_timeout`.
pub(super) fn build(
    config: &kube::Config,
    connect_timeout: Duration,
) -> Result<kube::Client, ClusterError> {
    let err = |e: &dyn std::fmt::Display| ClusterError::Connect(e.to_string());
    let mut tls = config.rustls_client_config().map_err(|e| err(&e))?;
    if let Some(roots) = config.root_cert.as_ref().filter(|r| !r.is_empty()) {
        let mut store = rustls::RootCertStore::empty();
        for der in roots {
            store
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| err(&e))?;
        }
        let webpki = WebPkiServerVerifier::builder(Arc::new(store))
            .build()
            .map_err(|e| err(&e))?;
        tls.dangerous()
            .set_certificate_verifier(Arc::new(AnchorAsLeaf {
                webpki,
                anchors: roots.clone(),
            }));
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    // `tls-server-name` in the kubeconfig: the name to verify when it differs from the URL's.
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|e| err(&e))?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let https = builder.enable_http1().wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(|e| err(&e))?)
        // Both auth layers (static token, refreshing token) must see one error type.
        .map_err(tower::BoxError::from)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

/// A failed call to the API server as this store reports it: a 403 names the verb, the
/// resource and the namespace; 5xx, 429 and no answer are an outage; a missing Secret says
/// how to create it.
pub(super) fn classify(
    verb: &'static str,
    resource: &str,
    namespace: &str,
    secret: &str,
    e: kube::Error,
) -> ClusterError {
    match e {
        kube::Error::Api(status) => match status.code {
            403 => ClusterError::Denied {
                verb,
                resource: resource.to_string(),
                namespace: namespace.to_string(),
            },
            404 if resource.starts_with("secrets") => ClusterError::MissingSecret {
                namespace: namespace.to_string(),
                name: secret.to_string(),
            },
            code if code >= 500 || code == 429 => ClusterError::Unreachable {
                action: format!("{verb} {resource}"),
                message: format!("{code} {}", status.message),
            },
            code => ClusterError::Api {
                action: format!("{verb} {resource}"),
                code,
                message: status.message.clone(),
            },
        },
        other => ClusterError::Unreachable {
            action: format!("{verb} {resource}"),
            message: other.to_string(),
        },
    }
}

/// webpki's verification, or a leaf identical to a configured anchor (see the module doc).
#[derive(Debug)]
struct AnchorAsLeaf {
    webpki: Arc<WebPkiServerVerifier>,
    anchors: Vec<Vec<u8>>,
}

impl ServerCertVerifier for AnchorAsLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            Err(e) => {
                let pinned = self
                    .anchors
                    .iter()
                    .any(|a| a.as_slice() == end_entity.as_ref());
                let named = webpki::EndEntityCert::try_from(end_entity)
                    .is_ok_and(|c| c.verify_is_valid_for_subject_name(server_name).is_ok());
                if pinned && named {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
