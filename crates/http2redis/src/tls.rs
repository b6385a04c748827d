//! TLS on the front's listener (`[http2redis.tls]`), so that thr can be
//! the edge when no other proxy terminates TLS: rustls, h2 or HTTP/1.1 by
//! ALPN, and the certificate and key read again at every configuration
//! reload (SIGHUP), so that a renewed certificate is served without a
//! restart. A reload whose files do not load keeps the pair in use.

use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thr_core::config::TlsFiles;
use tokio_rustls::TlsAcceptor;

/// The acceptor in force for new connections.
pub struct Tls {
    current: ArcSwap<TlsAcceptor>,
}

impl Tls {
    /// Loads the certificate chain and key; an error says which file and why.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Tls> {
        Ok(Tls {
            current: ArcSwap::from_pointee(acceptor(files)?),
        })
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::clone(&self.current.load())
    }

    /// Reads the files again: connections accepted from now on get the new
    /// pair; if they do not load, the pair in use stays and the error is
    /// logged.
    pub fn reload(&self, files: &TlsFiles) {
        match acceptor(files) {
            Ok(acceptor) => {
                self.current.store(Arc::new(acceptor));
                tracing::info!(cert = %files.cert.display(), "TLS certificate loaded");
            }
            Err(err) => {
                tracing::error!("keeping the TLS certificate in use: {err:#}");
            }
        }
    }
}

fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let cert = files.cert.display();
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{cert}: not a PEM certificate chain"))?;
    if chain.is_empty() {
        anyhow::bail!("{cert}: no certificate in it (\"BEGIN CERTIFICATE\")");
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("{}: not a PEM private key", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| format!("{cert} and {}", files.key.display()))?;
    // h2 first: clients that speak it get it; the others HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
