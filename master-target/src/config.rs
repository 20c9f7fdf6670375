//! The master target's configuration file (TOML).
//!
//! ```toml
//! listen = "127.0.0.1:10900"
//! data_dir = "mt-data"          # journals live in data_dir/<group>/journal
//! plain_tcp_loopback = true      # plain TCP only on a loopback address, and only if set
//! node = "mt1"                   # optional: the node id in our hello (default "master-target")
//! metrics = "127.0.0.1:9101"     # optional: serve GET /metrics (Prometheus) here
//! log_level = "info"             # optional: tracing directives; RUST_LOG wins when set
//! # [tls]                        # instead of plain_tcp_loopback: TLS 1.3, mutual
//! # ca = "certs/ca.pem"          # client certificates must be signed by this CA
//! # cert = "certs/master-target.pem"
//! # key = "certs/master-target.key"
//! [[group]]
//! id = "g1"
//! retention = "24h"              # optional: history kept; s, m, h, d or plain seconds (default 24h)
//! journal_bytes_max = "64GiB"    # optional: journal size limit, like size (default 64 GiB)
//! # journal_segment_bytes = "64MiB"      # optional: journal segment file size (default 64 MiB)
//! # retention_check_interval_ms = 10000  # optional: how often the fold runs (default 10 s)
//! [[group.disk]]
//! id = "disk0"
//! size = "64MiB"                 # bytes as an integer, or with a unit: B, KiB, MiB, GiB, TiB
//! replica = "replica-disk0.img"  # created (sparse, that size) by `serve` if missing
//! ```
//!
//! **Retention** (see `crate::retention` and [`datapath::retention`]): per group, a
//! background fold applies the journal's history older than `retention` to the replicas
//! and drops it, so points older than the window leave `points`. `journal_bytes_max`
//! bounds the journal's segment files: at 80% a warning is logged and shown in
//! `status`; beyond 100% the oldest points are folded (dropped for space) until it fits,
//! with a warning each time. The limit must be at least twice `journal_segment_bytes`
//! (1 MiB ..= 16 GiB), because only whole segments are removed and the active one
//! stays. `retention_check_interval_ms` (100 ..= 3600000) is how often the fold looks;
//! tests make it short. `retention` is at least 1 s; `"90m"`, `"36h"`, `"7d"`, `"30s"`,
//! `"45"` and `45` (seconds) are all accepted.
//!
//! `metrics` is read-only and unauthenticated: any address is allowed, but one that is
//! not loopback shows the groups' names and counters to whoever can reach it.
//!
//! Relative paths are taken relative to the directory of the config file, so a config
//! works wherever the command is started from. Unknown fields are refused, and every
//! error names the file and the field at fault.
//!
//! Transport rules (checked by [`Config::check_transport`] before `serve` listens):
//! with `[tls]` the server speaks TLS 1.3 only and requires a client certificate signed
//! by `tls.ca` (see `tls`); without it, plain TCP is served only when
//! `plain_tcp_loopback = true` AND `listen` is a loopback address. Both `[tls]` and
//! `plain_tcp_loopback = true` in one file is an error: it would be unclear which one
//! the operator meant.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// Node id used in our hello when the config names none.
pub const DEFAULT_NODE: &str = "master-target";

/// The whole file as written (before paths are resolved and values checked).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    data_dir: PathBuf,
    #[serde(default)]
    plain_tcp_loopback: bool,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default)]
    log_level: Option<String>,
    tls: Option<RawTls>,
    #[serde(default, rename = "group")]
    groups: Vec<RawGroup>,
}

/// `[tls]` as written; every field is required in the table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    id: String,
    #[serde(default)]
    retention: Option<DurationValue>,
    #[serde(default)]
    journal_bytes_max: Option<SizeValue>,
    #[serde(default)]
    journal_segment_bytes: Option<SizeValue>,
    #[serde(default)]
    retention_check_interval_ms: Option<u64>,
    #[serde(default, rename = "disk")]
    disks: Vec<RawDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    id: String,
    size: SizeValue,
    replica: PathBuf,
}

/// A size as written: an integer of bytes or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// A duration as written: an integer of seconds or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(u64),
    Text(String),
}

/// Default [`GroupConfig::journal_segment_bytes`].
pub const JOURNAL_SEGMENT_BYTES_DEFAULT: u64 = datapath::journal::SEGMENT_BYTES_DEFAULT;
/// Smallest [`GroupConfig::journal_segment_bytes`].
pub const JOURNAL_SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Default [`GroupConfig::retention_check_interval_ms`].
pub const RETENTION_CHECK_INTERVAL_MS_DEFAULT: u64 = 10_000;
/// Bounds of [`GroupConfig::retention_check_interval_ms`].
pub const RETENTION_CHECK_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// A checked configuration with absolute paths.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from (for messages).
    pub file: PathBuf,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub plain_tcp_loopback: bool,
    pub node: String,
    /// Where `GET /metrics` is served (`metrics`); `None`: nowhere.
    pub metrics: Option<SocketAddr>,
    /// Log directives (`log_level`); `RUST_LOG` wins when set. Default `info`.
    pub log_level: String,
    /// `[tls]`: serve TLS 1.3 with mutual authentication; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
    pub groups: Vec<GroupConfig>,
}

/// The PEM files of `[tls]`, absolute.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The deployment CA: a client certificate must be signed by it.
    pub ca: PathBuf,
    /// The master target's certificate (chain), signed by the CA.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// One replication group.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub id: String,
    pub disks: Vec<DiskConfig>,
    /// History kept (`retention`), at least 1 s.
    pub retention_ms: u64,
    /// Limit of the journal's segment files (`journal_bytes_max`).
    pub journal_bytes_max: u64,
    /// Size of one journal segment file (`journal_segment_bytes`).
    pub journal_segment_bytes: u64,
    /// How often the retention fold looks (`retention_check_interval_ms`).
    pub retention_check_interval_ms: u64,
}

/// One disk of a group.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub id: String,
    pub size_bytes: u64,
    pub replica: PathBuf,
}

impl Config {
    /// Reads and checks the config file at `file`.
    pub fn load(file: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("read config file {}", file.display()))?;
        let raw: RawConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", file.display()))?;
        let base = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(base)
            .with_context(|| format!("resolve the directory of {}", file.display()))?;
        Self::check(file, &base, raw)
    }

    fn check(file: &Path, base: &Path, raw: RawConfig) -> anyhow::Result<Config> {
        let at = |field: &str, why: &dyn fmt::Display| -> anyhow::Error {
            anyhow::anyhow!("config file {}: {field}: {why}", file.display())
        };
        let listen: SocketAddr = raw.listen.parse().map_err(|e| {
            at(
                "listen",
                &format!("{:?} is not an ip:port ({e})", raw.listen),
            )
        })?;
        let metrics = match &raw.metrics {
            None => None,
            Some(m) => Some(m.parse::<SocketAddr>().map_err(|e| {
                at(
                    "metrics",
                    &format!("{m:?} is not an ip:port such as \"127.0.0.1:9101\" ({e})"),
                )
            })?),
        };
        let log_level = raw.log_level.clone().unwrap_or_else(|| "info".to_string());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            return Err(at(
                "log_level",
                &format!("{log_level:?} is not a log filter such as \"info\" ({e})"),
            ));
        }
        let node = raw.node.unwrap_or_else(|| DEFAULT_NODE.to_string());
        if !datapath::valid_id(&node) {
            return Err(at(
                "node",
                &format!("{node:?} is not an id ([a-z0-9][a-z0-9_-]{{0,63}})"),
            ));
        }
        if raw.groups.is_empty() {
            return Err(at("group", &"at least one [[group]] is needed"));
        }
        let mut group_ids = BTreeSet::new();
        let mut groups = Vec::with_capacity(raw.groups.len());
        for g in raw.groups {
            let gfield = format!("group {:?}", g.id);
            if !datapath::valid_id(&g.id) {
                return Err(at(
                    "group.id",
                    &format!("{:?} is not an id ([a-z0-9][a-z0-9_-]{{0,63}})", g.id),
                ));
            }
            if !group_ids.insert(g.id.clone()) {
                return Err(at("group.id", &format!("{:?} is named twice", g.id)));
            }
            if g.disks.is_empty() {
                return Err(at(&gfield, &"at least one [[group.disk]] is needed"));
            }
            if g.disks.len() > usize::from(datapath::frame::MAX_HELLO_DISKS) {
                return Err(at(
                    &gfield,
                    &format!(
                        "{} disks, a hello carries at most {}",
                        g.disks.len(),
                        datapath::frame::MAX_HELLO_DISKS
                    ),
                ));
            }
            let mut disk_ids = BTreeSet::new();
            let mut disks = Vec::with_capacity(g.disks.len());
            for d in g.disks {
                let dfield = format!("{gfield} disk {:?}", d.id);
                if !datapath::valid_id(&d.id) {
                    return Err(at(
                        &format!("{gfield} disk.id"),
                        &format!("{:?} is not an id ([a-z0-9][a-z0-9_-]{{0,63}})", d.id),
                    ));
                }
                if !disk_ids.insert(d.id.clone()) {
                    return Err(at(
                        &format!("{gfield} disk.id"),
                        &format!("{:?} is named twice", d.id),
                    ));
                }
                let size_bytes =
                    parse_size(&d.size).map_err(|why| at(&format!("{dfield} size"), &why))?;
                if d.replica.as_os_str().is_empty() {
                    return Err(at(&format!("{dfield} replica"), &"empty path"));
                }
                disks.push(DiskConfig {
                    id: d.id,
                    size_bytes,
                    replica: base.join(d.replica),
                });
            }
            let retention_ms = match &g.retention {
                None => datapath::retention::RETENTION_MS_DEFAULT,
                Some(v) => {
                    parse_duration_ms(v).map_err(|why| at(&format!("{gfield} retention"), &why))?
                }
            };
            let journal_segment_bytes = match &g.journal_segment_bytes {
                None => JOURNAL_SEGMENT_BYTES_DEFAULT,
                Some(v) => parse_size(v)
                    .and_then(|b| {
                        let max = datapath::journal::SEGMENT_BYTES_LIMIT;
                        if (JOURNAL_SEGMENT_BYTES_MIN..=max).contains(&b) {
                            Ok(b)
                        } else {
                            Err(format!(
                                "{b} bytes is not in {JOURNAL_SEGMENT_BYTES_MIN}..={max} (1 MiB ..= 16 GiB)"
                            ))
                        }
                    })
                    .map_err(|why| at(&format!("{gfield} journal_segment_bytes"), &why))?,
            };
            let journal_bytes_max = match &g.journal_bytes_max {
                None => datapath::retention::JOURNAL_BYTES_MAX_DEFAULT,
                Some(v) => {
                    parse_size(v).map_err(|why| at(&format!("{gfield} journal_bytes_max"), &why))?
                }
            };
            if journal_bytes_max < 2 * journal_segment_bytes {
                return Err(at(
                    &format!("{gfield} journal_bytes_max"),
                    &format!(
                        "{journal_bytes_max} bytes is less than twice journal_segment_bytes \
                         ({journal_segment_bytes}): only whole segments can be dropped, and the \
                         active one always stays"
                    ),
                ));
            }
            let retention_check_interval_ms = g
                .retention_check_interval_ms
                .unwrap_or(RETENTION_CHECK_INTERVAL_MS_DEFAULT);
            if !RETENTION_CHECK_INTERVAL_MS_RANGE.contains(&retention_check_interval_ms) {
                return Err(at(
                    &format!("{gfield} retention_check_interval_ms"),
                    &format!(
                        "{retention_check_interval_ms} is not in {}..={}",
                        RETENTION_CHECK_INTERVAL_MS_RANGE.start(),
                        RETENTION_CHECK_INTERVAL_MS_RANGE.end()
                    ),
                ));
            }
            groups.push(GroupConfig {
                id: g.id,
                disks,
                retention_ms,
                journal_bytes_max,
                journal_segment_bytes,
                retention_check_interval_ms,
            });
        }
        if groups.len() > usize::from(datapath::frame::MAX_HELLO_GROUPS) {
            return Err(at(
                "group",
                &format!(
                    "{} groups, a hello carries at most {}",
                    groups.len(),
                    datapath::frame::MAX_HELLO_GROUPS
                ),
            ));
        }
        if raw.data_dir.as_os_str().is_empty() {
            return Err(at("data_dir", &"empty path"));
        }
        let tls = match raw.tls {
            None => None,
            Some(_) if raw.plain_tcp_loopback => {
                return Err(at(
                    "tls, plain_tcp_loopback",
                    &"[tls] and plain_tcp_loopback = true exclude each other: remove \
                      plain_tcp_loopback to serve TLS, or [tls] to serve plain TCP on loopback",
                ));
            }
            Some(t) => {
                for (field, path) in [
                    ("tls.ca", &t.ca),
                    ("tls.cert", &t.cert),
                    ("tls.key", &t.key),
                ] {
                    if path.as_os_str().is_empty() {
                        return Err(at(field, &"empty path"));
                    }
                }
                Some(TlsFiles {
                    ca: base.join(t.ca),
                    cert: base.join(t.cert),
                    key: base.join(t.key),
                })
            }
        };
        Ok(Config {
            file: file.to_path_buf(),
            listen,
            data_dir: base.join(raw.data_dir),
            plain_tcp_loopback: raw.plain_tcp_loopback,
            node,
            metrics,
            log_level,
            tls,
            groups,
        })
    }

    /// The group with this id.
    pub fn group(&self, id: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// The group's directory: its lock file and journal live there.
    pub fn group_dir(&self, group: &str) -> PathBuf {
        self.data_dir.join(group)
    }

    /// The group's journal directory.
    pub fn journal_dir(&self, group: &str) -> PathBuf {
        self.group_dir(group).join("journal")
    }

    /// The group's failback directory: state file and undo logs
    /// ([`datapath::failback`]).
    pub fn failback_dir(&self, group: &str) -> PathBuf {
        self.group_dir(group).join("failback")
    }

    /// Where `commit` writes the group's change lists: the blocks written after the
    /// point it committed, one `<disk>.chg` per disk ([`datapath::failback`]).
    pub fn changes_dir(&self, group: &str) -> PathBuf {
        self.group_dir(group).join("changed-since-point")
    }

    /// Refuses a transport the server may not use: with `[tls]` any listen address is
    /// fine; plain TCP needs `plain_tcp_loopback = true` and a loopback address.
    pub fn check_transport(&self) -> anyhow::Result<()> {
        if self.tls.is_some() {
            return Ok(());
        }
        if !self.plain_tcp_loopback {
            bail!(
                "config file {}: tls: no [tls] table, so serving is plain TCP, which needs \
                 plain_tcp_loopback = true (and a loopback listen address); add [tls] with \
                 ca, cert and key (see `master-target certs --help`)",
                self.file.display()
            );
        }
        if !self.listen.ip().is_loopback() {
            bail!(
                "config file {}: listen: {} is not a loopback address; plain TCP is only \
                 allowed on loopback (configure [tls] to listen elsewhere)",
                self.file.display(),
                self.listen
            );
        }
        Ok(())
    }
}

impl GroupConfig {
    /// The disk with this id.
    pub fn disk(&self, id: &str) -> Option<&DiskConfig> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// The group's disks as a point view names them (id and size, in config order).
    pub fn view_disks(&self) -> Vec<datapath::pointview::ViewDisk> {
        self.disks
            .iter()
            .map(|d| datapath::pointview::ViewDisk {
                id: d.id.clone(),
                size_bytes: d.size_bytes,
            })
            .collect()
    }

    /// The group's retention policy (the fold's step budget is the library default).
    pub fn retention_policy(&self) -> datapath::retention::Policy {
        datapath::retention::Policy {
            retention_ms: self.retention_ms,
            journal_bytes_max: self.journal_bytes_max,
            ..Default::default()
        }
    }
}

/// Parses a duration into milliseconds: an integer of seconds, or a string `<n><unit>`
/// with unit s, m, h or d (none: seconds; spaces allowed). At least 1 s.
fn parse_duration_ms(v: &DurationValue) -> Result<u64, String> {
    let secs = match v {
        DurationValue::Seconds(n) => *n,
        DurationValue::Text(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("{s:?} does not start with a number"))?;
            let mult: u64 = match unit.trim() {
                "" | "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86_400,
                u => return Err(format!("unknown unit {u:?} in {s:?} (s, m, h, d)")),
            };
            n.checked_mul(mult)
                .ok_or_else(|| format!("{s:?} is too long"))?
        }
    };
    if secs == 0 {
        return Err("must be at least 1 s".into());
    }
    secs.checked_mul(1000)
        .ok_or_else(|| format!("{secs} s is too long"))
}

/// Parses a size: an integer of bytes, or a string `<n><unit>` with unit B, KiB, MiB,
/// GiB or TiB (spaces allowed). It must be a positive multiple of 512.
fn parse_size(v: &SizeValue) -> Result<u64, String> {
    let bytes = match v {
        SizeValue::Bytes(n) => *n,
        SizeValue::Text(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("{s:?} does not start with a number of bytes"))?;
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                "TiB" => 1 << 40,
                u => {
                    return Err(format!(
                        "unknown unit {u:?} in {s:?} (B, KiB, MiB, GiB, TiB)"
                    ));
                }
            };
            n.checked_mul(mult)
                .ok_or_else(|| format!("{s:?} overflows 64 bits"))?
        }
    };
    if bytes == 0 || bytes % datapath::extent::SECTOR_BYTES != 0 {
        return Err(format!(
            "{bytes} bytes is not a positive multiple of {}",
            datapath::extent::SECTOR_BYTES
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("mt.toml");
        std::fs::write(&file, text)?;
        Config::load(&file)
    }

    const GOOD: &str = r#"
listen = "127.0.0.1:10900"
data_dir = "mt-data"
plain_tcp_loopback = true
[[group]]
id = "g1"
[[group.disk]]
id = "disk0"
size = "64MiB"
replica = "replica-disk0.img"
[[group.disk]]
id = "disk1"
size = 1048576
replica = "/abs/replica-disk1.img"
"#;

    /// Proves a good config loads with sizes parsed and relative paths resolved
    /// against the config file's directory (absolute ones kept).
    #[test]
    fn good_config_loads() {
        let c = load_str(GOOD).unwrap();
        assert_eq!(c.groups.len(), 1);
        let g = &c.groups[0];
        assert_eq!(g.disks[0].size_bytes, 64 << 20);
        assert_eq!(g.disks[1].size_bytes, 1 << 20);
        assert!(g.disks[0].replica.is_absolute());
        assert!(g.disks[0].replica.ends_with("replica-disk0.img"));
        assert_eq!(g.disks[1].replica, PathBuf::from("/abs/replica-disk1.img"));
        assert!(c.data_dir.is_absolute() && c.data_dir.ends_with("mt-data"));
        assert_eq!(c.node, DEFAULT_NODE);
        assert_eq!(c.metrics, None);
        let m = load_str(&format!("metrics = \"0.0.0.0:9101\"\n{GOOD}")).unwrap();
        assert_eq!(m.metrics, Some("0.0.0.0:9101".parse().unwrap()));
        assert!(c.tls.is_none());
        c.check_transport().unwrap();
    }

    /// Proves bad configs are refused with a message naming the file and the field.
    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (GOOD.replace("plain_tcp_loopback", "plain_tcp"), "plain_tcp"),
            (GOOD.replace("\"64MiB\"", "\"64MB\""), "size"),
            (GOOD.replace("\"64MiB\"", "\"1000B\""), "size"),
            (GOOD.replace("id = \"disk1\"", "id = \"disk0\""), "disk.id"),
            (GOOD.replace("id = \"g1\"", "id = \"G1\""), "group.id"),
            (GOOD.replace("127.0.0.1:10900", "nowhere"), "listen"),
            (GOOD.replace("size = 1048576\n", ""), "size"),
            (format!("metrics = \"9101\"\n{GOOD}"), "metrics"),
            (format!("log_level = \"info,=[\"\n{GOOD}"), "log_level"),
            (with_group("retention = \"2w\""), "group \"g1\" retention"),
            (with_group("retention = \"0s\""), "retention"),
            (with_group("retention = \"h\""), "retention"),
            (with_group("retention = -1"), "retention"),
            (
                with_group("journal_bytes_max = \"1GB\""),
                "journal_bytes_max",
            ),
            (
                with_group("journal_bytes_max = \"100MiB\""),
                "group \"g1\" journal_bytes_max",
            ),
            (
                with_group("journal_segment_bytes = \"512KiB\""),
                "journal_segment_bytes",
            ),
            (
                with_group("retention_check_interval_ms = 10"),
                "retention_check_interval_ms",
            ),
            (with_group("retension = \"1h\""), "retension"),
        ];
        for (text, field) in cases {
            let e = format!("{:#}", load_str(&text).unwrap_err());
            assert!(e.contains("mt.toml"), "no file in {e}");
            assert!(e.contains(field), "no {field} in {e}");
        }
    }

    /// GOOD with `line` added to its group.
    fn with_group(line: &str) -> String {
        GOOD.replacen("id = \"g1\"\n", &format!("id = \"g1\"\n{line}\n"), 1)
    }

    /// Proves the retention fields take their defaults, every duration syntax, and sizes
    /// like `size`.
    #[test]
    fn retention_fields() {
        let g = &load_str(GOOD).unwrap().groups[0];
        assert_eq!(g.retention_ms, 24 * 3600 * 1000);
        assert_eq!(g.journal_bytes_max, 64 << 30);
        assert_eq!(g.journal_segment_bytes, 64 << 20);
        assert_eq!(g.retention_check_interval_ms, 10_000);
        for (v, ms) in [
            ("\"2s\"", 2000),
            ("\"90m\"", 90 * 60_000),
            ("\"36h\"", 36 * 3_600_000),
            ("\" 7 d \"", 7 * 86_400_000),
            ("\"45\"", 45_000),
            ("45", 45_000),
        ] {
            let c = load_str(&with_group(&format!("retention = {v}"))).unwrap();
            assert_eq!(c.groups[0].retention_ms, ms, "{v}");
        }
        let c = load_str(&with_group(
            "journal_bytes_max = \"2MiB\"\njournal_segment_bytes = \"1MiB\"\nretention_check_interval_ms = 100",
        ))
        .unwrap();
        let g = &c.groups[0];
        assert_eq!(
            (g.journal_bytes_max, g.journal_segment_bytes),
            (2 << 20, 1 << 20)
        );
        assert_eq!(g.retention_check_interval_ms, 100);
        assert_eq!(g.retention_policy().journal_bytes_max, 2 << 20);
    }

    /// Proves plain TCP is refused off loopback or without the opt-in.
    #[test]
    fn plain_tcp_needs_loopback_and_opt_in() {
        let c = load_str(&GOOD.replace("127.0.0.1", "0.0.0.0")).unwrap();
        let e = format!("{:#}", c.check_transport().unwrap_err());
        assert!(e.contains("listen") && e.contains("loopback"), "{e}");
        let c = load_str(&GOOD.replace("plain_tcp_loopback = true", "")).unwrap();
        let e = format!("{:#}", c.check_transport().unwrap_err());
        assert!(
            e.contains("plain_tcp_loopback") && e.contains("mt.toml"),
            "{e}"
        );
    }

    const TLS: &str =
        "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/mt.pem\"\nkey = \"/abs/mt.key\"\n";

    /// Proves `[tls]` loads with paths resolved like the others, allows any listen
    /// address, and is refused together with plain_tcp_loopback, incomplete, or with an
    /// unknown field, naming the field.
    #[test]
    fn tls_table_rules() {
        let plain = GOOD.replace("plain_tcp_loopback = true\n", "");
        let with_tls =
            |text: &str, tls: &str| text.replacen("[[group]]", &format!("{tls}[[group]]"), 1);
        let c = load_str(&with_tls(&plain.replace("127.0.0.1", "0.0.0.0"), TLS)).unwrap();
        let t = c.tls.as_ref().unwrap();
        assert!(t.ca.is_absolute() && t.ca.ends_with("certs/ca.pem"));
        assert!(t.cert.ends_with("certs/mt.pem"));
        assert_eq!(t.key, PathBuf::from("/abs/mt.key"));
        c.check_transport().unwrap();

        let cases = [
            (with_tls(GOOD, TLS), "plain_tcp_loopback"),
            (with_tls(GOOD, TLS), "tls"),
            (
                with_tls(&plain, &TLS.replace("key = \"/abs/mt.key\"\n", "")),
                "key",
            ),
            (
                with_tls(&plain, &TLS.replace("ca = ", "cafile = ")),
                "cafile",
            ),
            (
                with_tls(&plain, &TLS.replace("certs/mt.pem", "")),
                "tls.cert",
            ),
        ];
        for (text, field) in cases {
            let e = format!("{:#}", load_str(&text).unwrap_err());
            assert!(e.contains("mt.toml"), "no file in {e}");
            assert!(e.contains(field), "no {field} in {e}");
        }
    }
}
