//! `master-target certs`: the certificates of a new deployment in one command.
//!
//! A deployment has its own CA; nothing else is trusted. The command writes, in a
//! directory of its own (created with mode 0700 when missing):
//!
//! | file                          | what                                  | goes to                                              |
//! |-------------------------------|---------------------------------------|------------------------------------------------------|
//! | `ca.pem`                      | the deployment CA's certificate       | the master target (`[tls] ca`) and every process server (`[target] ca`) |
//! | `ca.key`                      | the CA's private key                  | nowhere: keep it offline; no server reads it          |
//! | `master-target.pem`, `.key`   | the master target's certificate, key  | the master target (`[tls] cert`, `key`)               |
//! | `process-server-NODE.pem`, `.key` | process server NODE's certificate, key | that process server (`[target] cert`, `key`; its `node` must be NODE) |
//!
//! The master target's certificate is for server authentication and names `localhost`,
//! `127.0.0.1`, `::1` and every `--master-target-name` (DNS names or IP addresses: the
//! names process servers reach it by, their `[target] server_name`). A process server's
//! certificate is for client authentication and carries the node id as its subject CN
//! and as a DNS name; the master target accepts a hello only for that node. Keys are
//! ECDSA P-256 (PKCS#8), written with mode 0600; certificates with mode 0644. Every
//! certificate is valid from the first day of the current month (UTC) for
//! [`VALID_YEARS`] years.
//!
//! Nothing is ever overwritten: when any of the files exists, the command refuses
//! before writing anything and names the file. To rotate, generate a new deployment
//! into a new directory and roll it out to every machine.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::timefmt;

/// The CA's certificate.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";
/// The master target's certificate.
pub const MASTER_TARGET_CERT: &str = "master-target.pem";
/// The master target's private key.
pub const MASTER_TARGET_KEY: &str = "master-target.key";
/// Names the master target's certificate always carries (for loopback deployments).
pub const MASTER_TARGET_DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// How long the certificates are valid.
pub const VALID_YEARS: u64 = 10;

/// The certificate file of process server `node`.
pub fn process_server_cert(node: &str) -> String {
    format!("process-server-{node}.pem")
}

/// The key file of process server `node`.
pub fn process_server_key(node: &str) -> String {
    format!("process-server-{node}.key")
}

/// One file written, and which machine it belongs on.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    pub goes_to: String,
}

/// A file to write: its contents, mode and destination.
struct Planned {
    path: PathBuf,
    contents: String,
    mode: u32,
    goes_to: String,
}

/// Generates the deployment in `out` (see the module doc). `master_target_names` are
/// added to the defaults; `nodes` are process server node ids (at least one).
pub fn generate(
    out: &Path,
    master_target_names: &[String],
    nodes: &[String],
) -> anyhow::Result<Vec<Written>> {
    if nodes.is_empty() {
        bail!("--process-server: name at least one process server node id");
    }
    for (i, node) in nodes.iter().enumerate() {
        if !datapath::valid_id(node) {
            bail!("--process-server: {node:?} is not a node id ([a-z0-9][a-z0-9_-]{{0,63}})");
        }
        if nodes[..i].contains(node) {
            bail!("--process-server: {node:?} is named twice");
        }
    }
    let mut mt_names: Vec<String> = MASTER_TARGET_DEFAULT_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    for name in master_target_names {
        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            bail!("--master-target-name: {name:?} is neither a DNS name nor an IP address");
        }
        if !mt_names.contains(name) {
            mt_names.push(name.clone());
        }
    }

    // Every file is checked before any is written: a refusal leaves nothing behind.
    let mut files = vec![
        out.join(CA_CERT),
        out.join(CA_KEY),
        out.join(MASTER_TARGET_CERT),
        out.join(MASTER_TARGET_KEY),
    ];
    for n in nodes {
        files.push(out.join(process_server_cert(n)));
        files.push(out.join(process_server_key(n)));
    }
    for f in &files {
        if f.symlink_metadata().is_ok() {
            bail!(
                "{} exists; certs never overwrites a file (choose another --out directory, \
                 or remove the old deployment's files first)",
                f.display()
            );
        }
    }

    let plan = make(out, &mt_names, nodes)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("create directory {}", out.display()))?;
    let mut written = Vec::with_capacity(plan.len());
    for p in plan {
        write_new(&p.path, p.contents.as_bytes(), p.mode)?;
        written.push(Written {
            path: p.path,
            goes_to: p.goes_to,
        });
    }
    std::fs::File::open(out)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("sync directory {}", out.display()))?;
    Ok(written)
}

/// Makes every key and certificate in memory.
fn make(out: &Path, mt_names: &[String], nodes: &[String]) -> anyhow::Result<Vec<Planned>> {
    let now = timefmt::rfc3339_ms(timefmt::now_unix_ms());
    let mut ca_params = CertificateParams::default();
    set_validity(&mut ca_params);
    ca_params.distinguished_name = dn(&format!("blockrep deployment CA {now}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).context("sign the CA certificate")?;

    let leaf = |cn: &str, names: &[String], eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names.to_vec())
            .with_context(|| format!("certificate names {names:?}"))?;
        set_validity(&mut p);
        p.distinguished_name = dn(cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("generate a key")?;
        let cert = p
            .signed_by(&key, &ca)
            .with_context(|| format!("sign the certificate of {cn}"))?;
        anyhow::Ok((cert.pem(), key.serialize_pem()))
    };

    let mut plan = vec![
        Planned {
            path: out.join(CA_CERT),
            contents: ca.pem(),
            mode: 0o644,
            goes_to: "the master target and every process server ([tls] ca, [target] ca)".into(),
        },
        Planned {
            path: out.join(CA_KEY),
            contents: ca_key_pem,
            mode: 0o600,
            goes_to: "no server: keep it offline (it signs certificates)".into(),
        },
    ];
    let (cert, key) = leaf(
        "master-target",
        mt_names,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    plan.push(Planned {
        path: out.join(MASTER_TARGET_CERT),
        contents: cert,
        mode: 0o644,
        goes_to: "the master target ([tls] cert)".into(),
    });
    plan.push(Planned {
        path: out.join(MASTER_TARGET_KEY),
        contents: key,
        mode: 0o600,
        goes_to: "the master target ([tls] key)".into(),
    });
    for n in nodes {
        let (cert, key) = leaf(
            n,
            std::slice::from_ref(n),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        plan.push(Planned {
            path: out.join(process_server_cert(n)),
            contents: cert,
            mode: 0o644,
            goes_to: format!("process server {n} ([target] cert, node = {n:?})"),
        });
        plan.push(Planned {
            path: out.join(process_server_key(n)),
            contents: key,
            mode: 0o600,
            goes_to: format!("process server {n} ([target] key)"),
        });
    }
    Ok(plan)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "blockrep");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Valid from the first day of this month (UTC) for [`VALID_YEARS`] years. The first of
/// the month exists in every year, so the end date is always a date.
fn set_validity(p: &mut CertificateParams) {
    let days = timefmt::now_unix_ms() / 86_400_000;
    let (y, m, _) = timefmt::civil_from_days(days);
    let year = |y: u64| i32::try_from(y).unwrap_or(9000).min(9000);
    let month = u8::try_from(m).unwrap_or(1);
    p.not_before = rcgen::date_time_ymd(year(y), month, 1);
    p.not_after = rcgen::date_time_ymd(year(y + VALID_YEARS), month, 1);
}

/// Creates `path` (never replacing a file) with `mode`, writes and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

    use super::*;
    use crate::tls::ClientNames;

    fn cert(dir: &Path, name: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(name)).unwrap()
    }

    fn roots(dir: &Path) -> Arc<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert(dir, CA_CERT)).unwrap();
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Proves a deployment parses, the master target's certificate verifies against the
    /// CA for its default and extra names, each node's certificate verifies as a client
    /// and names its node, and keys are private.
    #[test]
    fn generated_certificates_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let names = vec!["mt.example".to_string(), "10.1.2.3".to_string()];
        let nodes = vec!["ps1".to_string(), "ps_2".to_string()];
        let written = generate(&dir, &names, &nodes).unwrap();
        assert_eq!(written.len(), 8);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for w in &written {
            let want = if w.path.extension().unwrap() == "key" {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode(&w.path), want, "{}", w.path.display());
        }
        for key in [CA_KEY, MASTER_TARGET_KEY, "process-server-ps1.key"] {
            PrivateKeyDer::from_pem_file(dir.join(key)).unwrap();
        }

        let server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&dir), provider())
                .build()
                .unwrap();
        let mt = cert(&dir, MASTER_TARGET_CERT);
        for name in ["localhost", "127.0.0.1", "::1", "mt.example", "10.1.2.3"] {
            let sn = ServerName::try_from(name).unwrap();
            server
                .verify_server_cert(&mt, &[], &sn, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("elsewhere.example").unwrap();
        assert!(
            server
                .verify_server_cert(&mt, &[], &other, &[], UnixTime::now())
                .is_err()
        );

        let client =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&dir), provider())
                .build()
                .unwrap();
        for node in &nodes {
            let c = cert(&dir, &process_server_cert(node));
            client.verify_client_cert(&c, &[], UnixTime::now()).unwrap();
            let n = ClientNames::from_der(&c).unwrap();
            assert_eq!(
                (n.common_names.as_slice(), n.dns_names.as_slice()),
                (&[node.clone()][..], &[node.clone()][..])
            );
        }
        // The server certificate is no client certificate and the other way round.
        assert!(
            client
                .verify_client_cert(&mt, &[], UnixTime::now())
                .is_err()
        );
        let c = cert(&dir, &process_server_cert("ps1"));
        let sn = ServerName::try_from("ps1").unwrap();
        assert!(
            server
                .verify_server_cert(&c, &[], &sn, &[], UnixTime::now())
                .is_err()
        );
    }

    /// Proves a second run into the same directory is refused, naming the file, and
    /// changes nothing; bad node ids and names are refused before anything is written.
    #[test]
    fn refuses_to_overwrite_and_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        generate(&dir, &[], &["ps1".to_string()]).unwrap();
        let before = std::fs::read(dir.join(CA_KEY)).unwrap();
        let e = format!(
            "{:#}",
            generate(&dir, &[], &["ps2".to_string()]).unwrap_err()
        );
        assert!(e.contains("ca.pem") && e.contains("exists"), "{e}");
        assert_eq!(std::fs::read(dir.join(CA_KEY)).unwrap(), before);
        assert!(!dir.join(process_server_cert("ps2")).exists());

        // Only one file in the way is enough.
        let dir2 = tmp.path().join("certs2");
        std::fs::create_dir(&dir2).unwrap();
        std::fs::write(dir2.join(process_server_key("ps9")), b"mine").unwrap();
        let e = format!(
            "{:#}",
            generate(&dir2, &[], &["ps9".to_string()]).unwrap_err()
        );
        assert!(e.contains("process-server-ps9.key"), "{e}");
        assert!(!dir2.join(CA_CERT).exists());

        let dir3 = tmp.path().join("certs3");
        for (names, nodes, want) in [
            (vec![], vec![], "--process-server"),
            (vec![], vec!["PS1".to_string()], "PS1"),
            (vec![], vec!["a".to_string(), "a".to_string()], "twice"),
            (
                vec!["bad name".to_string()],
                vec!["a".to_string()],
                "--master-target-name",
            ),
        ] {
            let e = format!("{:#}", generate(&dir3, &names, &nodes).unwrap_err());
            assert!(e.contains(want), "{want} not in {e}");
            assert!(!dir3.exists());
        }
    }
}
