//! TLS between process servers and the master target: TLS 1.3 only, both sides
//! authenticated by certificates of one deployment CA.
//!
//! # Setup
//!
//! `master-target certs --out DIR --process-server NODE ...` (module [`crate::certs`])
//! makes the deployment CA, the master target's certificate and one client certificate
//! per process server node. The master target's config names them in `[tls]`:
//!
//! ```toml
//! [tls]
//! ca = "certs/ca.pem"                 # client certificates must be signed by it
//! cert = "certs/master-target.pem"
//! key = "certs/master-target.key"
//! ```
//!
//! and each process server's `[target]` names `ca`, its own `cert` and `key`.
//!
//! # Rules
//!
//! - Only TLS 1.3 is offered (rustls without its TLS 1.2 code), with the `ring`
//!   provider named explicitly, so nothing depends on a process-wide default provider.
//! - A client must present a certificate that chains to `tls.ca` and is valid for
//!   client authentication; otherwise the handshake fails. A handshake that fails or
//!   takes longer than [`HANDSHAKE_TIMEOUT_MS`] is logged at warn with the peer's
//!   address and the connection is closed; no Error frame can be sent without a
//!   session. Every other connection is served on.
//! - Identity: the client certificate's names (its subject CN and its DNS names, see
//!   [`ClientNames`]) must include the node id of the process server's Hello; otherwise
//!   the hello is refused with `AUTH` (see `server`). The node id decides which
//!   connection may take a group over from another, so a node may only speak for
//!   itself.
//!
//! Without `[tls]` the server speaks plain TCP, only on a loopback address and only
//! with `plain_tcp_loopback = true` (see `config`).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsFiles;

/// A TLS handshake that has not finished in this time is abandoned.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Builds the server side from the `[tls]` files: TLS 1.3 only, a client certificate
/// signed by the CA required. Errors name the config file, the field and the PEM file.
pub fn server_config(files: &TlsFiles, config_file: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let at = |field: &str, path: &Path| {
        format!(
            "config file {}: tls.{field}: {}",
            config_file.display(),
            path.display()
        )
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for der in read_certs(&files.ca).with_context(|| at("ca", &files.ca))? {
        roots
            .add(der)
            .with_context(|| format!("{}: not a usable CA certificate", at("ca", &files.ca)))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .with_context(|| at("ca", &files.ca))?;
    let chain = read_certs(&files.cert).with_context(|| at("cert", &files.cert))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("read a PEM private key: {e}"))
        .with_context(|| at("key", &files.key))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "config file {}: tls.cert and tls.key: {} and {} do not make a usable \
                 certificate and key",
                config_file.display(),
                files.cert.display(),
                files.key.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// Reads every certificate of a PEM file; at least one.
fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("read PEM certificates: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "no CERTIFICATE block in the file");
    Ok(certs)
}

/// Runs the server side of the handshake within [`HANDSHAKE_TIMEOUT_MS`]. On failure
/// logs at warn with the peer and returns `None` (the connection is dropped, closing
/// it); on success returns the stream and the client certificate's names.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(TlsStream<TcpStream>, ClientNames)> {
    let handshake = tokio::time::timeout(
        Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
        acceptor.accept(stream),
    )
    .await;
    let stream = match handshake {
        Err(_) => {
            tracing::warn!(
                %peer,
                "TLS handshake: not finished within {HANDSHAKE_TIMEOUT_MS} ms; connection closed"
            );
            return None;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, "TLS handshake failed: {e}; connection closed");
            return None;
        }
        Ok(Ok(s)) => s,
    };
    // The verifier demands a certificate, so a session without one cannot happen; it is
    // still refused here rather than trusted.
    let names = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => Err("no client certificate".to_string()),
        Some(der) => ClientNames::from_der(der),
    };
    match names {
        Ok(names) => {
            tracing::debug!(%peer, client = %names, "TLS 1.3 session established");
            Some((stream, names))
        }
        Err(why) => {
            tracing::warn!(%peer, "TLS client certificate: {why}; connection closed");
            None
        }
    }
}

/// The names a client certificate gives its holder: the subject's common names and the
/// DNS names of its subjectAltName extension. `master-target certs` puts the node id
/// in both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientNames {
    pub common_names: Vec<String>,
    pub dns_names: Vec<String>,
}

impl ClientNames {
    /// Whether `node` is one of the names (exact, byte for byte: node ids are lowercase).
    pub fn names(&self, node: &str) -> bool {
        self.common_names
            .iter()
            .chain(&self.dns_names)
            .any(|n| n == node)
    }

    /// Reads the names out of a DER certificate. The certificate was verified against
    /// the CA before, but the reader still checks every length and never panics.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        der::client_names(der).map_err(|why| format!("cannot read its names: {why}"))
    }
}

impl fmt::Display for ClientNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.common_names.is_empty() && self.dns_names.is_empty() {
            return write!(f, "no name (no CN, no DNS name)");
        }
        write!(
            f,
            "CN {:?}, DNS names {:?}",
            self.common_names, self.dns_names
        )
    }
}

/// Just enough DER (X.509, RFC 5280) to find a certificate's subject CNs and its
/// subjectAltName DNS names. Definite lengths only, single-byte tags only.
mod der {
    use super::ClientNames;

    /// id-at-commonName, 2.5.4.3.
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    /// id-ce-subjectAltName, 2.5.29.17.
    const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const IA5_STRING: u8 = 0x16;
    /// `[0] EXPLICIT Version` of the TBSCertificate.
    const TBS_VERSION: u8 = 0xa0;
    /// `[3] EXPLICIT Extensions` of the TBSCertificate.
    const TBS_EXTENSIONS: u8 = 0xa3;
    /// `dNSName [2] IMPLICIT IA5String` of a GeneralName.
    const GENERAL_NAME_DNS: u8 = 0x82;

    /// Takes one tag-length-value off the front of `input`.
    fn tlv<'a>(input: &mut &'a [u8]) -> Result<(u8, &'a [u8]), &'static str> {
        let &[tag, first, ref rest @ ..] = *input else {
            return Err("truncated element");
        };
        if tag & 0x1f == 0x1f {
            return Err("multi-byte tag");
        }
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err("bad length");
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err("element longer than its container");
        }
        let (value, after) = rest.split_at(len);
        *input = after;
        Ok((tag, value))
    }

    /// Takes one element that must have tag `want`.
    fn expect<'a>(
        input: &mut &'a [u8],
        want: u8,
        what: &'static str,
    ) -> Result<&'a [u8], &'static str> {
        match tlv(input)? {
            (tag, value) if tag == want => Ok(value),
            _ => Err(what),
        }
    }

    fn text(tag: u8, value: &[u8]) -> Option<String> {
        match tag {
            UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
                std::str::from_utf8(value).ok().map(str::to_owned)
            }
            _ => None,
        }
    }

    pub(super) fn client_names(der: &[u8]) -> Result<ClientNames, &'static str> {
        let mut input = der;
        let mut cert = expect(&mut input, SEQUENCE, "not a certificate")?;
        let mut tbs = expect(&mut cert, SEQUENCE, "no TBSCertificate")?;
        // version (optional), serialNumber, signature, issuer, validity, subject.
        let (mut tag, _) = tlv(&mut tbs)?;
        if tag == TBS_VERSION {
            tag = tlv(&mut tbs)?.0;
        }
        if tag != 0x02 {
            return Err("no serial number");
        }
        for what in ["no signature algorithm", "no issuer", "no validity"] {
            expect(&mut tbs, SEQUENCE, what)?;
        }
        let mut names = ClientNames::default();
        let mut subject = expect(&mut tbs, SEQUENCE, "no subject")?;
        while !subject.is_empty() {
            let mut rdn = expect(&mut subject, SET, "bad subject name")?;
            while !rdn.is_empty() {
                let mut atv = expect(&mut rdn, SEQUENCE, "bad subject attribute")?;
                let oid = expect(&mut atv, OID, "bad subject attribute type")?;
                let (tag, value) = tlv(&mut atv)?;
                if oid == OID_CN
                    && let Some(cn) = text(tag, value)
                {
                    names.common_names.push(cn);
                }
            }
        }
        expect(&mut tbs, SEQUENCE, "no subject public key")?;
        // issuerUniqueID [1], subjectUniqueID [2] (both rare), extensions [3].
        while !tbs.is_empty() {
            let (tag, mut value) = tlv(&mut tbs)?;
            if tag != TBS_EXTENSIONS {
                continue;
            }
            let mut exts = expect(&mut value, SEQUENCE, "bad extensions")?;
            while !exts.is_empty() {
                let mut ext = expect(&mut exts, SEQUENCE, "bad extension")?;
                let oid = expect(&mut ext, OID, "bad extension id")?;
                let (mut tag, mut value) = tlv(&mut ext)?;
                if tag == BOOLEAN {
                    (tag, value) = tlv(&mut ext)?;
                }
                if tag != OCTET_STRING {
                    return Err("bad extension value");
                }
                if oid != OID_SAN {
                    continue;
                }
                let mut general = expect(&mut value, SEQUENCE, "bad subjectAltName")?;
                while !general.is_empty() {
                    let (tag, value) = tlv(&mut general)?;
                    if tag == GENERAL_NAME_DNS
                        && let Some(dns) = text(IA5_STRING, value)
                    {
                        names.dns_names.push(dns);
                    }
                }
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(cn: &str, sans: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "blockrep");
        if !cn.is_empty() {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        p.self_signed(&key).unwrap().der().to_vec()
    }

    /// Proves the names are read from real certificates: CN and DNS names, IP names
    /// ignored, and a certificate without either names nothing.
    #[test]
    fn reads_cn_and_dns_names() {
        let n = ClientNames::from_der(&leaf("ps1", &["ps1", "10.0.0.1", "other.example"])).unwrap();
        assert_eq!(n.common_names, ["ps1"]);
        assert_eq!(n.dns_names, ["ps1", "other.example"]);
        assert!(n.names("ps1") && n.names("other.example"));
        assert!(!n.names("ps2") && !n.names("10.0.0.1") && !n.names("PS1"));
        let n = ClientNames::from_der(&leaf("", &["ps_2"])).unwrap();
        assert!(n.common_names.is_empty() && n.names("ps_2"));
        let n = ClientNames::from_der(&leaf("only-cn", &[])).unwrap();
        assert!(n.names("only-cn") && n.dns_names.is_empty());
        assert!(format!("{}", ClientNames::default()).contains("no name"));
    }

    /// Proves truncated or corrupted certificates give an error or some names, never a
    /// panic, and garbage is refused.
    #[test]
    fn bad_der_never_panics() {
        let good = leaf("ps1", &["ps1"]);
        for len in 0..good.len() {
            assert!(ClientNames::from_der(&good[..len]).is_err(), "prefix {len}");
        }
        for i in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                let _ = ClientNames::from_der(&bad);
            }
        }
        assert!(ClientNames::from_der(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(ClientNames::from_der(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(ClientNames::from_der(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err());
    }
}
