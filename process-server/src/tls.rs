//! The shipper's connection to the master target: TLS 1.3 with a client certificate, or
//! plain TCP to a loopback address.
//!
//! With `ca`, `cert` and `key` in `[target]` (files made by `master-target certs`), the
//! shipper connects TCP, then runs a TLS 1.3 handshake (rustls without its TLS 1.2 code,
//! the `ring` provider named explicitly) within [`HANDSHAKE_TIMEOUT_MS`]: it presents
//! `cert` (whose subject must name this process server's `node`, or the master target
//! refuses the hello with `AUTH`), and accepts only a master target certificate signed
//! by `ca` and valid for `server_name` (default: the IP of `address`). Without them the
//! connection is plain TCP, which the config allows only to a loopback address and only
//! with `plain_tcp = true` (see `config`).
//!
//! Either way the result is one [`Stream`]; the shipper's hello, acks and frames run
//! over it unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::TargetTls;

/// A TLS handshake that has not finished in this time is abandoned (and retried with
/// the shipper's backoff).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// A connection to the master target, TLS or plain.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The client side of TLS, built once from the `[target]` files.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsClient {
    /// Reads the CA, the certificate and the key; errors name the field and the file.
    pub fn load(t: &TargetTls) -> anyhow::Result<Self> {
        let at =
            |field: &str, path: &std::path::Path| format!("target.{field}: {}", path.display());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for der in read_certs(&t.ca).with_context(|| at("ca", &t.ca))? {
            roots
                .add(der)
                .with_context(|| format!("{}: not a usable CA certificate", at("ca", &t.ca)))?;
        }
        let chain = read_certs(&t.cert).with_context(|| at("cert", &t.cert))?;
        let key = PrivateKeyDer::from_pem_file(&t.key)
            .map_err(|e| anyhow::anyhow!("read a PEM private key: {e}"))
            .with_context(|| at("key", &t.key))?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .with_context(|| {
                format!(
                    "target.cert and target.key: {} and {} do not make a usable certificate \
                     and key",
                    t.cert.display(),
                    t.key.display()
                )
            })?;
        let server_name = ServerName::try_from(t.server_name.clone())
            .with_context(|| format!("target.server_name: {:?}", t.server_name))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

/// Reads every certificate of a PEM file; at least one.
fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("read PEM certificates: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "no CERTIFICATE block in the file");
    Ok(certs)
}

/// Connects to the master target: TCP (no Nagle delay), then the TLS handshake when
/// `tls` is given. Returns the stream and a word for the logs ("TLS 1.3" or "plain TCP").
pub async fn connect(
    address: SocketAddr,
    tls: Option<&TlsClient>,
) -> anyhow::Result<(Box<dyn Stream>, &'static str)> {
    let tcp = TcpStream::connect(address)
        .await
        .with_context(|| format!("connect to {address}"))?;
    tcp.set_nodelay(true).context("set TCP_NODELAY")?;
    let Some(tls) = tls else {
        return Ok((Box::new(tcp), "plain TCP"));
    };
    let handshake = tokio::time::timeout(
        Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
        tls.connector.connect(tls.server_name.clone(), tcp),
    )
    .await;
    let why = match handshake {
        Ok(Ok(stream)) => return Ok((Box::new(stream), "TLS 1.3")),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("not finished within {HANDSHAKE_TIMEOUT_MS} ms"),
    };
    // Louder than a refused connect (which the shipper logs at debug): a handshake that
    // fails is most likely a certificate or name that does not fit, and retrying will
    // not fix it.
    tracing::warn!(
        target = %address,
        server_name = ?tls.server_name.to_str(),
        "TLS handshake failed: {why}"
    );
    anyhow::bail!(
        "TLS handshake with {address} (server name {:?}): {why}",
        tls.server_name.to_str()
    )
}
