//! `process-server changed`: a disk's writes that the master target has not
//! acknowledged, as a change list ([`datapath::changelist`]), for a reprotect in the
//! other direction that compares only the blocks that may differ.
//!
//! ```text
//! process-server changed --config FILE --disk D --out FILE [--json]
//! ```
//!
//! After a failback at the other site, this site's disks hold the point plus every
//! write made here after it. The ones the master target journaled are in its change
//! list (written by its `commit`); the others are exactly the blocks whose dirty bits
//! are still set here: a bit is cleared only once the master target acknowledged the
//! block's last write as durable. This command writes those blocks.
//!
//! It runs offline: it takes the state directory's lock ([`StateLock`]), so it refuses
//! while `serve` runs, and opens the disk's group the way `serve` does
//! ([`crate::tracking::open_group`]): after an unclean end, every hot region's blocks
//! are dirty again (a superset, never less). It then closes the group cleanly (a
//! resync still owed stays owed), so the next `serve` loses nothing. A disk still in
//! its initial sync is listed whole. A disk that has no dirty bitmap here was never
//! protected by this process server: refused, since nothing here knows its writes.
//!
//! The list must be taken after the process server stopped for good: writes through
//! a later `serve` would not be in it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use datapath::changelist::{self, Origin};
use datapath::extent::Extent;
use datapath::storage::RealFs;
use datapath::tracker::{DiskSpec, GroupTracker};
use serde::Serialize;

use crate::config::Config;
use crate::ship_state::ShipState;
use crate::tracking::{StateLock, now_unix_ms, open_group};

/// Dirty blocks are read this much at a time (bounded memory: the list is streamed).
const RUN_BYTES_MAX: u64 = 1 << 30;

/// What `changed` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Written {
    pub group: String,
    pub disk: String,
    pub path: PathBuf,
    /// `unacknowledged-writes`.
    pub origin: &'static str,
    /// The last point the master target acknowledged, if any.
    pub point_id: Option<u64>,
    pub extents: u64,
    /// 4 KiB blocks listed.
    pub blocks: u64,
    pub disk_blocks: u64,
    /// The disk was still in its initial sync: listed whole.
    pub initial_sync: bool,
    /// The previous run ended uncleanly: every hot region's blocks are in the list.
    pub unclean: bool,
}

/// Writes the change list of `disk` to `out` (see the module doc).
pub fn run(config: &Config, disk: &str, out: &Path) -> anyhow::Result<Written> {
    let group = config
        .groups
        .iter()
        .find(|g| g.disks.iter().any(|d| d.id == disk))
        .with_context(|| {
            let all: Vec<&str> = config
                .groups
                .iter()
                .flat_map(|g| g.disks.iter().map(|d| d.id.as_str()))
                .collect();
            format!("unknown disk {disk:?} (disks: {})", all.join(", "))
        })?;
    let _lock = StateLock::acquire(&config.tracking.state_dir)?;
    let dir = config.tracking.state_dir.join(&group.id);
    if !GroupTracker::has_bitmap(&RealFs, &dir, disk) {
        bail!(
            "disk {disk:?} has no dirty bitmap in {}: this process server never protected \
             it, so nothing here knows its writes",
            dir.display()
        );
    }
    let specs = group
        .disks
        .iter()
        .map(|d| {
            d.open().map(|(_, size_bytes)| DiskSpec {
                id: d.id.clone(),
                size_bytes,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (t, rep) = open_group(config, &group.id, &specs)?;
    let r = write_list(config, &group.id, disk, &specs, &t, &dir, out);
    t.shutdown()
        .with_context(|| format!("group {}: close change tracking cleanly", group.id))?;
    let mut w = r?;
    w.unclean = rep.unclean;
    Ok(w)
}

fn write_list(
    config: &Config,
    group: &str,
    disk: &str,
    specs: &[DiskSpec],
    t: &GroupTracker,
    dir: &Path,
    out: &Path,
) -> anyhow::Result<Written> {
    let size = specs
        .iter()
        .find(|d| d.id == disk)
        .map(|d| d.size_bytes)
        .context("the disk's size")?;
    let initial = t.initial_sync_disks().iter().any(|d| d == disk);
    let point_id = ShipState::load(&RealFs, dir)
        .with_context(|| format!("group {group}: read the shipping state"))?
        .map(|s| s.epoch)
        .filter(|&p| p > 0);
    let meta = changelist::Meta {
        origin: Origin::Unacknowledged,
        group: group.to_string(),
        disk: disk.to_string(),
        node: config
            .target
            .as_ref()
            .map(|t| t.node.clone())
            .unwrap_or_default(),
        disk_bytes: size,
        point_id,
        created_unix_ms: now_unix_ms(),
    };
    let mut at = 0u64;
    let dirty = std::iter::from_fn(|| {
        let e = t.next_dirty_run(disk, at, RUN_BYTES_MAX)?;
        at = e.end();
        Some(e)
    });
    let whole = std::iter::once(Extent {
        offset: 0,
        len: size,
    });
    let (out_dir, name) = split_out(out)?;
    let h = if initial {
        changelist::write(&RealFs, out_dir, name, &meta, whole)
    } else {
        changelist::write(&RealFs, out_dir, name, &meta, dirty)
    }
    .with_context(|| format!("write the change list of disk {disk}"))?;
    Ok(Written {
        group: group.to_string(),
        disk: disk.to_string(),
        path: out.to_path_buf(),
        origin: Origin::Unacknowledged.name(),
        point_id,
        extents: h.extent_count,
        blocks: h.block_count,
        disk_blocks: size.div_ceil(changelist::BLOCK_BYTES),
        initial_sync: initial,
        unclean: false,
    })
}

/// The directory and file name of `--out` (a bare name is in the current directory).
fn split_out(out: &Path) -> anyhow::Result<(&Path, &str)> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("--out {}: not a file name", out.display()))?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!(
            "--out {}: directory {} does not exist",
            out.display(),
            dir.display()
        );
    }
    Ok((dir, name))
}

/// The human form of what was written.
pub fn text(w: &Written) -> String {
    let since = w.point_id.map_or_else(
        || "any acknowledged point".to_string(),
        |p| format!("point {p}"),
    );
    let mut s = format!(
        "disk {} (group {}): {} of {} blocks of 4 KiB not acknowledged by the master target \
         since {since}, in {} extents -> {}\n",
        w.disk,
        w.group,
        w.blocks,
        w.disk_blocks,
        w.extents,
        w.path.display()
    );
    if w.initial_sync {
        s.push_str("  the disk is still in its initial sync: every block is listed\n");
    }
    if w.unclean {
        s.push_str(
            "  the last run did not stop cleanly: the blocks of every region it was writing \
             are listed too\n",
        );
    }
    s
}
