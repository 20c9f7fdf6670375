//! The config file (TOML). Every path is relative to the file's directory, unknown
//! fields are refused, and every error names the file and the field.
//!
//! ```toml
//! metrics = "127.0.0.1:9100"   # optional: serve GET /metrics (Prometheus) here
//! log_level = "info"           # optional: tracing directives; RUST_LOG wins when set
//!
//! [nbd]
//! listen = "127.0.0.1:10809"   # port 0: any free port (logged at start)
//!
//! [tracking]                   # optional, defaults shown
//! state_dir = "ps-state"       # spools, bitmaps, shipping state, control socket
//! cut_interval_ms = 1000       # a crash-consistent point this often
//! spool_bytes_max = "1GiB"     # full: bitmap-only tracking until a resync
//! spool_segment_bytes = "64MiB"
//! initial_sync = true          # first protection ships every non-zero block
//! hash_diff = true             # ... or only the blocks the master target's copy lacks
//!
//! [[group]]
//! id = "g1"
//! freeze = "fsfreeze -f /mnt"  # optional hooks around app-consistent points
//! thaw = "fsfreeze -u /mnt"
//! hook_timeout_ms = 10000
//! app_consistent_interval_s = 900  # optional: an app-consistent point this often
//! [[group.disk]]
//! id = "disk0"                 # the NBD export name
//! path = "disk0.img"           # file or block device
//! size = "64MiB"               # created sparse if missing; if present, must match
//! initial_sync_changed = ["b-disk0.chg", "a-disk0.chg"]  # optional, see below
//!
//! [target]                     # optional: without it nothing is shipped
//! address = "127.0.0.1:10900"  # the master target
//! node = "ps1"                 # this process server's node id
//! plain_tcp = true             # plain TCP: only to a loopback address, only if set
//! # or TLS 1.3 with a client certificate (files from `master-target certs`), any address:
//! # ca = "certs/ca.pem"
//! # cert = "certs/process-server-ps1.pem"
//! # key = "certs/process-server-ps1.key"
//! # server_name = "mt.example" # default: the IP of `address`
//! ```
//!
//! Shipping transport rules: with `ca`, `cert` and `key` (all three, or none) the
//! shipper speaks TLS 1.3 to any address, presents `cert` (its subject must name
//! `node`: the master target refuses a hello for another node) and accepts only a master
//! target certificate signed by `ca` and valid for `server_name`. Without them it speaks
//! plain TCP, and only to a loopback address with `plain_tcp = true`; both at once is
//! an error.
//!
//! `initial_sync_changed` (a reprotect after a failback) names change lists
//! ([`datapath::changelist`]): the master target's `commit` writes one per disk
//! (`data_dir/<group>/changed-since-point/<disk>.chg`, the writes after the point), the
//! old process server's `process-server changed` another (its writes the master target
//! never acknowledged). When the disk has no dirty bitmap yet (its first protection
//! here), its initial sync starts with only the union of the lists dirty instead of
//! every block, and (with `hash_diff`) sends only the blocks of it that really differ.
//! Each list must be for this disk id and size: otherwise, or when one is damaged or
//! missing, `serve` refuses to start and creates nothing. Once the disk has a bitmap
//! the lists are not read again. Not with `initial_sync = false`.
//!
//! `size` takes an integer (bytes) or a string with a suffix `B`, `KiB`, `MiB`, `GiB`,
//! `TiB`. It may be left out when the path exists: the disk then has its current size.
//!
//! `metrics` is a top-level key, so it must come before the first `[table]` (TOML puts
//! every key after a table header into that table). The endpoint is read-only and
//! unauthenticated: any address is allowed, but one that is not loopback shows the
//! groups' and disks' names and counters to whoever can reach it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The config as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    metrics: Option<String>,
    log_level: Option<String>,
    nbd: FileNbd,
    #[serde(default)]
    tracking: FileTracking,
    #[serde(rename = "group", default)]
    groups: Vec<FileGroup>,
    target: Option<FileTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    address: String,
    node: String,
    #[serde(default)]
    plain_tcp: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNbd {
    listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTracking {
    state_dir: Option<PathBuf>,
    cut_interval_ms: Option<u64>,
    spool_bytes_max: Option<SizeSpec>,
    spool_segment_bytes: Option<SizeSpec>,
    initial_sync: Option<bool>,
    hash_diff: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGroup {
    id: String,
    freeze: Option<String>,
    thaw: Option<String>,
    hook_timeout_ms: Option<u64>,
    app_consistent_interval_s: Option<u64>,
    #[serde(rename = "disk", default)]
    disks: Vec<FileDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    id: String,
    path: PathBuf,
    size: Option<SizeSpec>,
    #[serde(default)]
    initial_sync_changed: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Bytes(u64),
    Text(String),
}

/// The validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where the NBD server listens.
    pub listen: SocketAddr,
    pub tracking: TrackingConfig,
    pub groups: Vec<GroupConfig>,
    /// Where changes are shipped (`[target]`); `None`: nothing is shipped.
    pub target: Option<TargetConfig>,
    /// Where `GET /metrics` is served (`metrics`); `None`: nowhere.
    pub metrics: Option<SocketAddr>,
    /// Log directives (`log_level`, e.g. `info` or `info,process_server::shipper=debug`);
    /// `RUST_LOG` wins when set. Default `info`.
    pub log_level: String,
}

/// The master target to ship to (`[target]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetConfig {
    /// The master target's address; a loopback address when `tls` is `None`.
    pub address: SocketAddr,
    /// This process server's node id in its hello.
    pub node: String,
    /// TLS 1.3 with a client certificate; `None`: plain TCP (loopback only).
    pub tls: Option<TargetTls>,
}

/// The TLS files of `[target]` (absolute) and the name the master target's certificate
/// must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetTls {
    /// The deployment CA: the master target's certificate must be signed by it.
    pub ca: PathBuf,
    /// This process server's certificate (chain), signed by the CA.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// A DNS name or IP address; default: the IP of `address`.
    pub server_name: String,
}

/// Change tracking (`[tracking]`, every field optional).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackingConfig {
    /// Spools and dirty bitmaps live in `state_dir/<group>` (default `ps-state`).
    pub state_dir: PathBuf,
    /// A crash-consistent cut of every group this often (default 1000 ms).
    pub cut_interval_ms: u64,
    /// Bound of each group's spool (default 1 GiB); when full, the group falls back to
    /// bitmap-only tracking.
    pub spool_bytes_max: u64,
    /// Size of one spool segment file (default 64 MiB).
    pub spool_segment_bytes: u64,
    /// Ship every block of a disk protected for the first time (default true). False
    /// only when the replica is known to equal the disk already (e.g. both blank).
    pub initial_sync: bool,
    /// The initial sync compares block hashes with the master target's copy and ships
    /// only the blocks that differ (default true; needs protocol 3 at the master
    /// target, which answers "no copy" for a blank replica: then every block ships).
    pub hash_diff: bool,
}

/// Default of `tracking.cut_interval_ms`.
pub const CUT_INTERVAL_MS_DEFAULT: u64 = 1000;
/// Default of `tracking.spool_bytes_max`.
pub const SPOOL_BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Default of `tracking.spool_segment_bytes`.
pub const SPOOL_SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;

fn size_field(field: &str, v: Option<SizeSpec>, default: u64) -> anyhow::Result<u64> {
    match v {
        None => Ok(default),
        Some(SizeSpec::Bytes(n)) => Ok(n),
        Some(SizeSpec::Text(s)) => parse_size(&s)
            .with_context(|| format!("{field}: {s:?} is not a size (e.g. 4096, \"64MiB\")")),
    }
}

/// One consistency group: its disks are cut together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    pub id: String,
    /// Quiesce and resume commands for app-consistent points (run with `sh -c`).
    pub hooks: Hooks,
    /// An app-consistent point (freeze, cut, thaw) this often; `None`: only on demand.
    pub app_consistent_interval_s: Option<u64>,
    pub disks: Vec<DiskConfig>,
}

/// A group's freeze and thaw hooks (`freeze`, `thaw`, `hook_timeout_ms`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Run before an app-consistent cut, e.g. `fsfreeze -f /mnt` or a database's
    /// quiesce command. Failing or outrunning the timeout yields a crash-consistent
    /// point and a warning.
    pub freeze: Option<String>,
    /// Run after the cut, always (also when the freeze failed), so the machine is
    /// never left frozen.
    pub thaw: Option<String>,
    /// How long each hook may run (default 10 s).
    pub timeout_ms: u64,
}

/// Default of `group.hook_timeout_ms`.
pub const HOOK_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// One protected disk, served as the NBD export named `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub id: String,
    /// Absolute (resolved against the config file's directory).
    pub path: PathBuf,
    /// Required size; `None`: whatever the existing file or device has.
    pub size_bytes: Option<u64>,
    /// Change lists (absolute) whose union is all the first initial sync must compare
    /// (`initial_sync_changed`; see [`datapath::tracker`], "Initial sync from change
    /// lists"); empty: every block. Read only while the disk has no dirty bitmap yet.
    pub initial_sync_changed: Vec<PathBuf>,
}

/// Parses a size: an integer of bytes with an optional binary suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "K" => 10,
        "MiB" | "M" => 20,
        "GiB" | "G" => 30,
        "TiB" | "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        // A bare file name has an empty parent: its directory is the current one.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self::parse(&text, dir).with_context(|| format!("config file {}", path.display()))
    }

    /// Parses config text; relative paths are resolved against `dir`.
    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let file: FileConfig = toml::from_str(text)?;
        let listen: SocketAddr =
            file.nbd.listen.parse().with_context(|| {
                format!("nbd.listen: {:?} is not an address:port", file.nbd.listen)
            })?;
        let t = file.tracking;
        let tracking = TrackingConfig {
            state_dir: dir.join(t.state_dir.unwrap_or_else(|| PathBuf::from("ps-state"))),
            cut_interval_ms: t.cut_interval_ms.unwrap_or(CUT_INTERVAL_MS_DEFAULT),
            spool_bytes_max: size_field(
                "tracking.spool_bytes_max",
                t.spool_bytes_max,
                SPOOL_BYTES_MAX_DEFAULT,
            )?,
            spool_segment_bytes: size_field(
                "tracking.spool_segment_bytes",
                t.spool_segment_bytes,
                SPOOL_SEGMENT_BYTES_DEFAULT,
            )?,
            initial_sync: t.initial_sync.unwrap_or(true),
            hash_diff: t.hash_diff.unwrap_or(true),
        };
        if tracking.cut_interval_ms < 10 {
            bail!(
                "tracking.cut_interval_ms: {} is below 10 ms",
                tracking.cut_interval_ms
            );
        }
        if tracking.spool_segment_bytes < (1 << 20)
            || tracking.spool_bytes_max < 2 * tracking.spool_segment_bytes
        {
            bail!(
                "tracking: spool_segment_bytes must be at least 1 MiB and spool_bytes_max at least twice it (got {} and {})",
                tracking.spool_segment_bytes,
                tracking.spool_bytes_max
            );
        }
        let mut groups = Vec::new();
        let mut group_ids = HashSet::new();
        let mut disk_ids = HashSet::new();
        for (gi, g) in file.groups.into_iter().enumerate() {
            if !datapath::valid_id(&g.id) {
                bail!(
                    "group[{gi}].id: {:?} is not a valid id ([a-z0-9][a-z0-9_-]{{0,63}})",
                    g.id
                );
            }
            if !group_ids.insert(g.id.clone()) {
                bail!("group[{gi}].id: {:?} appears twice", g.id);
            }
            let mut disks = Vec::new();
            for (di, d) in g.disks.into_iter().enumerate() {
                let field = format!("group[{gi}].disk[{di}]");
                if !datapath::valid_id(&d.id) {
                    bail!(
                        "{field}.id: {:?} is not a valid id ([a-z0-9][a-z0-9_-]{{0,63}})",
                        d.id
                    );
                }
                if !disk_ids.insert(d.id.clone()) {
                    bail!(
                        "{field}.id: {:?} appears twice (disk ids are export names and must be unique)",
                        d.id
                    );
                }
                let size_bytes = match d.size {
                    None => None,
                    Some(SizeSpec::Bytes(n)) => Some(n),
                    Some(SizeSpec::Text(s)) => Some(parse_size(&s).with_context(|| {
                        format!(
                            "{field}.size: {s:?} is not a size (e.g. 4096, \"64MiB\", \"2GiB\")"
                        )
                    })?),
                };
                if size_bytes == Some(0) {
                    bail!("{field}.size: must not be zero");
                }
                if d.path.as_os_str().is_empty() {
                    bail!("{field}.path: empty");
                }
                if !d.initial_sync_changed.is_empty() && !tracking.initial_sync {
                    bail!(
                        "{field}.initial_sync_changed: change lists narrow the initial sync, \
                         which tracking.initial_sync = false turns off; drop one of them"
                    );
                }
                if d.initial_sync_changed
                    .iter()
                    .any(|p| p.as_os_str().is_empty())
                {
                    bail!("{field}.initial_sync_changed: an empty path");
                }
                disks.push(DiskConfig {
                    id: d.id,
                    path: dir.join(d.path),
                    size_bytes,
                    initial_sync_changed: d
                        .initial_sync_changed
                        .iter()
                        .map(|p| dir.join(p))
                        .collect(),
                });
            }
            let hooks = Hooks {
                freeze: g.freeze.filter(|c| !c.trim().is_empty()),
                thaw: g.thaw.filter(|c| !c.trim().is_empty()),
                timeout_ms: g.hook_timeout_ms.unwrap_or(HOOK_TIMEOUT_MS_DEFAULT),
            };
            if hooks.timeout_ms == 0 {
                bail!("group[{gi}].hook_timeout_ms: must not be zero");
            }
            if g.app_consistent_interval_s == Some(0) {
                bail!(
                    "group[{gi}].app_consistent_interval_s: must not be zero (leave it out for on-demand points only)"
                );
            }
            groups.push(GroupConfig {
                id: g.id,
                hooks,
                app_consistent_interval_s: g.app_consistent_interval_s,
                disks,
            });
        }
        if disk_ids.is_empty() {
            bail!("group: no disk configured (add [[group]] with [[group.disk]])");
        }
        let target = match file.target {
            None => None,
            Some(t) => {
                let address: SocketAddr = t.address.parse().with_context(|| {
                    format!("target.address: {:?} is not an address:port", t.address)
                })?;
                if !datapath::valid_id(&t.node) {
                    bail!(
                        "target.node: {:?} is not a valid id ([a-z0-9][a-z0-9_-]{{0,63}})",
                        t.node
                    );
                }
                let tls = target_tls(&t, address, dir)?;
                if tls.is_none() {
                    if !t.plain_tcp {
                        bail!(
                            "target.plain_tcp: no ca, cert and key, so shipping would be plain TCP, which needs plain_tcp = true (and a loopback address); for TLS set target.ca, target.cert and target.key (see `master-target certs --help`)"
                        );
                    }
                    if !address.ip().is_loopback() {
                        bail!(
                            "target.address: {address} is not a loopback address; plain TCP is only allowed to loopback (set target.ca, target.cert and target.key for TLS)"
                        );
                    }
                }
                Some(TargetConfig {
                    address,
                    node: t.node,
                    tls,
                })
            }
        };
        let metrics = match file.metrics {
            None => None,
            Some(m) => Some(m.parse::<SocketAddr>().with_context(|| {
                format!("metrics: {m:?} is not an address:port (e.g. \"127.0.0.1:9100\")")
            })?),
        };
        let log_level = file.log_level.unwrap_or_else(|| "info".to_string());
        tracing_subscriber::EnvFilter::try_new(&log_level).with_context(|| {
            format!("log_level: {log_level:?} is not a log filter (e.g. \"info\" or \"info,process_server::shipper=debug\")")
        })?;
        Ok(Self {
            listen,
            tracking,
            groups,
            target,
            metrics,
            log_level,
        })
    }
}

/// The TLS part of `[target]`: all of ca, cert and key, or none (then no server_name
/// either); not together with plain_tcp.
fn target_tls(
    t: &FileTarget,
    address: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Option<TargetTls>> {
    let files = [("ca", &t.ca), ("cert", &t.cert), ("key", &t.key)];
    let set: Vec<&str> = files
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(n, _)| *n)
        .collect();
    if set.is_empty() {
        if t.server_name.is_some() {
            bail!(
                "target.server_name: only used with TLS, and target.ca, target.cert and target.key are not set"
            );
        }
        return Ok(None);
    }
    if t.plain_tcp {
        bail!(
            "target.plain_tcp and target.{}: plain_tcp = true and TLS files exclude each other; remove plain_tcp to ship over TLS",
            set[0]
        );
    }
    let mut paths = Vec::with_capacity(3);
    for (name, v) in files {
        match v {
            None => bail!(
                "target.{name}: missing; TLS needs target.ca, target.cert and target.key (set: {})",
                set.join(", ")
            ),
            Some(p) if p.as_os_str().is_empty() => bail!("target.{name}: empty path"),
            Some(p) => paths.push(dir.join(p)),
        }
    }
    let server_name = match &t.server_name {
        None => address.ip().to_string(),
        Some(n) => {
            if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
                bail!("target.server_name: {n:?} is neither a DNS name nor an IP address");
            }
            n.clone()
        }
    };
    let [ca, cert, key] =
        <[PathBuf; 3]>::try_from(paths).map_err(|_| anyhow::anyhow!("target: ca, cert and key"))?;
    Ok(Some(TargetTls {
        ca,
        cert,
        key,
        server_name,
    }))
}

impl DiskConfig {
    /// Opens the backing file or device for reading and writing, creating a sparse
    /// file of the configured size if the path does not exist. Returns it with its size.
    pub fn open(&self) -> anyhow::Result<(File, u64)> {
        let exists = self.path.exists();
        if !exists && self.size_bytes.is_none() {
            bail!(
                "disk {}: {} does not exist and no size is configured to create it",
                self.id,
                self.path.display()
            );
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!exists)
            .truncate(false)
            .open(&self.path)
            .with_context(|| format!("disk {}: open {}", self.id, self.path.display()))?;
        if !exists {
            let size = self.size_bytes.unwrap_or(0);
            file.set_len(size).with_context(|| {
                format!("disk {}: size {} to {size}", self.id, self.path.display())
            })?;
            file.sync_all()
                .with_context(|| format!("disk {}: sync {}", self.id, self.path.display()))?;
            if let Some(parent) = self.path.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .with_context(|| {
                        format!("disk {}: sync directory {}", self.id, parent.display())
                    })?;
            }
        }
        // Seeking to the end measures regular files and block devices alike (the
        // metadata length of a block device is 0).
        let size = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("disk {}: measure {}", self.id, self.path.display()))?;
        if let Some(want) = self.size_bytes
            && want != size
        {
            bail!(
                "disk {}: {} has {size} bytes but the config says size = {want}",
                self.id,
                self.path.display()
            );
        }
        if size == 0 {
            bail!("disk {}: {} is empty", self.id, self.path.display());
        }
        Ok((file, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[nbd]
listen = "127.0.0.1:0"
[[group]]
id = "g1"
[[group.disk]]
id = "disk0"
path = "d0.img"
size = "1MiB"
[[group.disk]]
id = "disk1"
path = "/abs/d1.img"
size = 4096
"#;

    /// Proves a good config parses, with relative paths under the config's directory.
    #[test]
    fn parses_and_resolves_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/ps")).unwrap();
        assert_eq!(c.listen.port(), 0);
        let d = &c.groups[0].disks;
        assert_eq!(d[0].path, Path::new("/etc/ps/d0.img"));
        assert_eq!(d[0].size_bytes, Some(1 << 20));
        assert_eq!(d[1].path, Path::new("/abs/d1.img"));
        assert_eq!(d[1].size_bytes, Some(4096));
        assert_eq!(c.target, None);
        assert_eq!(c.metrics, None);
        let m = format!("metrics = \"0.0.0.0:9100\"\n{GOOD}");
        let m = Config::parse(&m, Path::new("/etc/ps")).unwrap();
        assert_eq!(m.metrics, Some("0.0.0.0:9100".parse().unwrap()));
        let t = format!(
            "{GOOD}[target]\naddress = \"127.0.0.1:10900\"\nnode = \"ps1\"\nplain_tcp = true\n"
        );
        let c = Config::parse(&t, Path::new("/etc/ps")).unwrap();
        let t = c.target.unwrap();
        assert_eq!(t.address.port(), 10900);
        assert_eq!(t.node, "ps1");
        assert_eq!(t.tls, None);
    }

    const TLS: &str = "ca = \"certs/ca.pem\"\ncert = \"certs/ps1.pem\"\nkey = \"/abs/ps1.key\"\n";

    fn with_target(target: &str) -> String {
        format!("{GOOD}[target]\nnode = \"ps1\"\n{target}")
    }

    /// Proves TLS in `[target]`: paths resolved against the config's directory, any
    /// address allowed, server_name defaulting to the address's IP or as given.
    #[test]
    fn target_tls_parses() {
        let text = with_target(&format!("address = \"10.0.0.1:10900\"\n{TLS}"));
        let c = Config::parse(&text, Path::new("/etc/ps")).unwrap();
        let tls = c.target.unwrap().tls.unwrap();
        assert_eq!(tls.ca, Path::new("/etc/ps/certs/ca.pem"));
        assert_eq!(tls.cert, Path::new("/etc/ps/certs/ps1.pem"));
        assert_eq!(tls.key, Path::new("/abs/ps1.key"));
        assert_eq!(tls.server_name, "10.0.0.1");
        let text = with_target(&format!(
            "address = \"[::1]:10900\"\n{TLS}server_name = \"mt.example\"\n"
        ));
        let c = Config::parse(&text, Path::new("/etc/ps")).unwrap();
        assert_eq!(c.target.unwrap().tls.unwrap().server_name, "mt.example");
    }

    /// Proves the transport rules of `[target]` name the field at fault: plain TCP needs
    /// the opt-in and a loopback address, TLS needs all three files and excludes
    /// plain_tcp, server_name needs TLS and must be a name.
    #[test]
    fn target_transport_rules() {
        let lo = "address = \"127.0.0.1:10900\"\n";
        let far = "address = \"10.0.0.1:10900\"\n";
        let cases = [
            (format!("{far}plain_tcp = true\n"), "target.address"),
            (format!("{far}plain_tcp = true\n"), "loopback"),
            (lo.to_string(), "target.plain_tcp"),
            (
                format!("{lo}plain_tcp = true\n{TLS}"),
                "target.plain_tcp and target.ca",
            ),
            (
                format!("{far}{}", TLS.replace("key = \"/abs/ps1.key\"\n", "")),
                "target.key: missing",
            ),
            (
                format!("{far}{}", TLS.replace("ca = \"certs/ca.pem\"\n", "")),
                "target.ca: missing",
            ),
            (format!("{far}cert = \"c.pem\"\n"), "target.ca: missing"),
            (
                format!("{far}{TLS}").replace("certs/ps1.pem", ""),
                "target.cert: empty",
            ),
            (
                format!("{lo}plain_tcp = true\nserver_name = \"mt\"\n"),
                "target.server_name",
            ),
            (
                format!("{far}{TLS}server_name = \"not a name\"\n"),
                "target.server_name",
            ),
            (format!("{far}{TLS}cafile = \"x\"\n"), "cafile"),
        ];
        for (target, want) in cases {
            let err = format!(
                "{:#}",
                Config::parse(&with_target(&target), Path::new("/")).unwrap_err()
            );
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    /// Proves unknown fields, bad ids, duplicate ids and bad sizes are refused, naming the field.
    #[test]
    fn refuses_bad_configs() {
        let cases = [
            (
                GOOD.replace("size = 4096", "size = 4096\ncolor = 1"),
                "color",
            ),
            (
                GOOD.replace("id = \"disk1\"", "id = \"Disk1\""),
                "group[0].disk[1].id",
            ),
            (
                GOOD.replace("id = \"disk1\"", "id = \"disk0\""),
                "appears twice",
            ),
            (
                GOOD.replace("\"1MiB\"", "\"1 parsec\""),
                "group[0].disk[0].size",
            ),
            (GOOD.replace("127.0.0.1:0", "nowhere"), "nbd.listen"),
            (GOOD.replace("[nbd]", "[nbdx]"), "nbdx"),
            (format!("metrics = \"9100\"\n{GOOD}"), "metrics"),
            (format!("log_level = \"info,=[\"\n{GOOD}"), "log_level"),
            (
                format!(
                    "{GOOD}[target]\naddress = \"10.0.0.1:10900\"\nnode = \"ps1\"\nplain_tcp = true\n"
                ),
                "loopback",
            ),
            (
                format!("{GOOD}[target]\naddress = \"127.0.0.1:10900\"\nnode = \"PS\"\n"),
                "target.node",
            ),
            (
                format!("{GOOD}[target]\naddress = \"here\"\nnode = \"ps1\"\n"),
                "target.address",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Config::parse(&text, Path::new("/")).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    /// Proves `initial_sync_changed` lists resolve against the config's directory, and
    /// are refused with `initial_sync = false` or an empty path, naming the field.
    #[test]
    fn initial_sync_changed_lists() {
        let text = GOOD.replace(
            "size = \"1MiB\"",
            "size = \"1MiB\"\ninitial_sync_changed = [\"b.chg\", \"/abs/a.chg\"]",
        );
        let c = Config::parse(&text, Path::new("/etc/ps")).unwrap();
        let d = &c.groups[0].disks[0];
        assert_eq!(
            d.initial_sync_changed,
            [Path::new("/etc/ps/b.chg"), Path::new("/abs/a.chg")]
        );
        assert!(c.groups[0].disks[1].initial_sync_changed.is_empty());
        let off = format!("[tracking]\ninitial_sync = false\n{text}");
        let err = format!("{:#}", Config::parse(&off, Path::new("/")).unwrap_err());
        assert!(
            err.contains("group[0].disk[0].initial_sync_changed")
                && err.contains("initial_sync = false"),
            "{err}"
        );
        let empty = text.replace("\"b.chg\"", "\"\"");
        let err = format!("{:#}", Config::parse(&empty, Path::new("/")).unwrap_err());
        assert!(err.contains("empty path"), "{err}");
    }

    /// Proves sizes parse with and without suffixes and overflow is refused.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("2 GiB"), Some(2 << 30));
        assert_eq!(parse_size("99999999999TiB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("1.5GiB"), None);
    }

    /// Proves open creates a sparse file of the configured size, reopens it, and
    /// refuses a size mismatch.
    #[test]
    fn open_creates_and_checks_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = DiskConfig {
            id: "d".into(),
            path: dir.path().join("d.img"),
            size_bytes: Some(1 << 20),
            initial_sync_changed: Vec::new(),
        };
        assert_eq!(d.open().unwrap().1, 1 << 20);
        assert_eq!(d.open().unwrap().1, 1 << 20);
        d.size_bytes = None;
        assert_eq!(d.open().unwrap().1, 1 << 20);
        d.size_bytes = Some(2 << 20);
        let err = format!("{:#}", d.open().unwrap_err());
        assert!(err.contains("config says"), "{err}");
        d.path = dir.path().join("missing.img");
        d.size_bytes = None;
        assert!(d.open().is_err());
    }
}
