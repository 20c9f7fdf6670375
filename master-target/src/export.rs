//! Test failover: every disk of a group, as it was at a recovery point, served as an NBD
//! export (export name = disk id), without touching the replicas and without stopping
//! replication.
//!
//! Reads come from a [`PointView`] (the replica with the journal's frames through the
//! point laid over it: an index of extent tables, not a copy, so the export is ready in
//! the time it takes to read one small table per frame). Writes from the test machine
//! go to a sparse **overlay** file per disk in `data_dir/<group>/export-<pid>/`, and a
//! map of the byte ranges written sends later reads of them there. The overlay is
//! throwaway: it is removed when the export ends, and nothing of it ever reaches a
//! replica or the journal. A FLUSH syncs the overlay (the test machine's own view of
//! durability holds while the export lives).
//!
//! The NBD server is write capture's ([`process_server::nbd_server`]) with a
//! [`BlockStore`] per disk and no capture hook.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use datapath::journal::{FrameEntry, Journal};
use datapath::pointview::{IndexStats, PointIndex, PointView, RangeMap, ViewDisk};
use datapath::storage::RealFs;
use process_server::nbd_server::{BlockStore, Export, Exports};

use crate::config::{Config, GroupConfig};

/// A disk at a point, with writes going to an overlay.
pub struct PointStore {
    disk: usize,
    view: Arc<Mutex<PointView>>,
    overlay: File,
    overlay_path: PathBuf,
    /// Byte ranges written through the export (they are in the overlay).
    written: Mutex<RangeMap<()>>,
}

impl std::fmt::Debug for PointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointStore")
            .field("disk", &self.disk)
            .field("overlay", &self.overlay_path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> io::Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| io::Error::other("an export thread panicked"))
}

impl BlockStore for PointStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let pieces = lock(&self.written)?.pieces(offset, end);
        for (from, to, written) in pieces {
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if written.is_some() {
                self.overlay.read_exact_at(out, from)?;
            } else {
                lock(&self.view)?
                    .read(self.disk, from, out)
                    .map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.overlay.write_all_at(data, offset)?;
        lock(&self.written)?.insert(offset, offset + data.len() as u64, ());
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }
}

/// The exports of a group at a point, and their overlay directory (removed on drop).
pub struct PointExports {
    pub exports: Arc<Exports>,
    pub stats: IndexStats,
    dir: PathBuf,
}

impl Drop for PointExports {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "remove the export overlay: {e}");
        }
    }
}

/// The frame entries from the journal's base through point `point_id` (which must be a
/// consistent point of the journal).
pub fn entries_through(journal: &Journal, point_id: u64) -> anyhow::Result<Vec<FrameEntry>> {
    let Some(p) = journal.point_by_id(point_id) else {
        bail!(
            "group {:?} has no point {point_id} (see `master-target points`)",
            journal.group()
        );
    };
    if !p.record.consistent {
        bail!(
            "point {point_id} of group {:?} is inconsistent (cut during a resync): it cannot be exported",
            journal.group()
        );
    }
    (journal.base_seq() + 1..=p.seq)
        .map(|s| {
            journal
                .entry(s)
                .copied()
                .with_context(|| format!("journal frame {s} is not in the index"))
        })
        .collect()
}

/// Builds the exports of `group` at the point whose frames are `frames` (see
/// [`entries_through`]), with overlays in `data_dir/<group>/export-<pid>`.
pub fn build(
    cfg: &Config,
    group: &GroupConfig,
    frames: &[FrameEntry],
) -> anyhow::Result<PointExports> {
    let disks: Vec<ViewDisk> = group
        .disks
        .iter()
        .map(|d| ViewDisk {
            id: d.id.clone(),
            size_bytes: d.size_bytes,
        })
        .collect();
    let fs = Arc::new(RealFs);
    let (index, stats) =
        PointIndex::build(fs.as_ref(), &cfg.journal_dir(&group.id), frames, &disks)
            .with_context(|| format!("group {:?}: index the journal", group.id))?;
    let replicas: Vec<PathBuf> = group.disks.iter().map(|d| d.replica.clone()).collect();
    let view = Arc::new(Mutex::new(
        PointView::new(index, fs, &replicas).with_context(|| format!("group {:?}", group.id))?,
    ));
    let dir = cfg
        .group_dir(&group.id)
        .join(format!("export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let list = (|| {
        let mut list = Vec::new();
        for (i, d) in group.disks.iter().enumerate() {
            let overlay_path = dir.join(format!("overlay-{}.img", d.id));
            let overlay = open_overlay(&overlay_path, d.size_bytes)?;
            list.push(Export {
                id: d.id.clone(),
                group: group.id.clone(),
                store: Arc::new(PointStore {
                    disk: i,
                    view: view.clone(),
                    overlay,
                    overlay_path,
                    written: Mutex::new(RangeMap::default()),
                }),
                path: d.replica.clone(),
                size_bytes: d.size_bytes,
            });
        }
        anyhow::Ok(list)
    })();
    match list {
        Ok(list) => Ok(PointExports {
            exports: Arc::new(Exports::new(list)),
            stats,
            dir,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn open_overlay(path: &Path, size: u64) -> anyhow::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("create overlay {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("size overlay {}", path.display()))?;
    Ok(f)
}

/// Resolves a point spec for an export: a point id, `latest` (the newest consistent
/// point) or `latest-app` (the newest consistent app-consistent point).
pub fn resolve_point(journal: &Journal, spec: &str) -> anyhow::Result<u64> {
    let consistent = journal
        .points()
        .iter()
        .rev()
        .filter(|p| p.record.consistent);
    let found = match spec {
        "latest" | "latest-processed" => consistent.map(|p| p.record.point_id).next(),
        "latest-app" => consistent
            .filter(|p| p.record.kind == datapath::frame::PointKind::App)
            .map(|p| p.record.point_id)
            .next(),
        id => Some(id.parse::<u64>().with_context(|| {
            format!("--point {id:?}: not a point id, latest, latest-processed or latest-app")
        })?),
    };
    found.with_context(|| {
        format!(
            "group {:?} has no {spec} point (see `master-target points`)",
            journal.group()
        )
    })
}

/// `master-target export` with no server running: holds the group's lock, builds the
/// exports of the point and serves them on `listen` until SIGINT or SIGTERM. Prints
/// `listening on ADDR` on stdout once they are ready.
pub fn run_offline(
    cfg: &Config,
    group: &str,
    spec: &str,
    listen: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let g = cfg
        .group(group)
        .with_context(|| format!("group {group:?} is not in {}", cfg.file.display()))?;
    let _lock = crate::store::GroupLock::acquire(cfg, group)?;
    let t0 = std::time::Instant::now();
    let (journal, _) = crate::store::open_journal(cfg, group)?;
    let point_id = resolve_point(&journal, spec)?;
    let frames = entries_through(&journal, point_id)?;
    drop(journal);
    let px = build(cfg, g, &frames)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listen on {listen} (--listen)"))?;
        let local = listener.local_addr().context("local address")?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("install SIGTERM handler")?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("install SIGINT handler")?;
        tracing::info!(
            group,
            point = point_id,
            data_frames = px.stats.data_frames,
            extents = px.stats.extents,
            ready_ms = t0.elapsed().as_millis() as u64,
            "export ready: writes go to a throwaway overlay"
        );
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on {local}").context("write to stdout")?;
            out.flush().context("flush stdout")?;
        }
        let capture: Arc<dyn process_server::capture::Capture> =
            Arc::new(process_server::capture::NoCapture);
        tokio::select! {
            r = process_server::nbd_server::serve(listener, px.exports.clone(), capture) => {
                r.context("serve NBD")?;
            }
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        tracing::info!(group, point = point_id, "export ended: overlay removed");
        anyhow::Ok(())
    })?;
    drop(px);
    Ok(())
}
