//! What the master target keeps on disk, per group and per disk, and who may open it.
//!
//! | path                          | what                                                   |
//! |-------------------------------|--------------------------------------------------------|
//! | `data_dir/<group>/lock`       | empty; `serve`, `points`, `status`, `failback` and `commit` hold an exclusive `flock` on it while they use the group |
//! | `data_dir/<group>/journal/`   | the group's [`datapath::journal`], and the retention fold's intent (`retention.intent`, [`datapath::retention`]) |
//! | `data_dir/<group>/failback/`  | the group's failback state and undo logs ([`datapath::failback`]); absent while it replicates |
//! | `data_dir/<group>/changed-since-point/` | written by `commit`: per disk a change list (`<disk>.chg`, [`datapath::changelist`]) of the journal frames after the committed point, for a reprotect that compares only those blocks |
//! | each disk's `replica`         | the replica image, `size` bytes (sparse when created)  |
//!
//! **Why a lock.** [`Journal::open`] may cut a torn tail and remove folded segments; two
//! processes doing that to the same directory, or one doing it under a running server,
//! would destroy acknowledged frames. The lock is an advisory `flock` that the kernel
//! drops when the process dies (kill -9 included), so it never goes stale. `points` and
//! `status` therefore never open a journal while `serve` runs: they ask the running
//! server over its control socket, and read the files only when no server runs.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use datapath::journal::{Journal, JournalConfig, JournalRecovery};
use datapath::storage::{RealFs, try_lock_file};

use crate::config::{Config, DiskConfig};

/// An exclusive hold on one group's files; released on drop or process exit.
#[derive(Debug)]
pub struct GroupLock {
    _file: File,
}

impl GroupLock {
    /// Takes the group's lock without waiting; an error says who holds it.
    pub fn acquire(cfg: &Config, group: &str) -> anyhow::Result<GroupLock> {
        let dir = cfg.group_dir(group);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("create group directory {}", dir.display()))?;
        let path = dir.join("lock");
        match try_lock_file(&path).with_context(|| format!("lock {}", path.display()))? {
            Some(file) => Ok(GroupLock { _file: file }),
            None => bail!(
                "group {group:?} is in use by another master-target process (lock {} is \
                 held; is `master-target serve` running? stop it first)",
                path.display()
            ),
        }
    }
}

/// The journal config of `group`.
pub fn journal_config(cfg: &Config, group: &str) -> JournalConfig {
    JournalConfig {
        segment_bytes_max: cfg
            .group(group)
            .map_or(JournalConfig::default().segment_bytes_max, |g| {
                g.journal_segment_bytes
            }),
        ..JournalConfig::default()
    }
}

/// Opens (creating if needed) the journal of `group`. The caller holds its [`GroupLock`].
pub fn open_journal(cfg: &Config, group: &str) -> anyhow::Result<(Journal, JournalRecovery)> {
    let dir = cfg.journal_dir(group);
    let (j, rec) = Journal::open(Arc::new(RealFs), &dir, group, journal_config(cfg, group))
        .with_context(|| format!("open journal of group {group:?} in {}", dir.display()))?;
    log_indexes(group, &rec);
    Ok((j, rec))
}

/// Logs what opening a journal did with its segment indexes (derived files: a missing
/// or unusable one was rebuilt from its segment's frames, one that could not be written
/// costs a later reader a scan of that segment).
fn log_indexes(group: &str, rec: &JournalRecovery) {
    for (first_seq, why) in &rec.indexes_rebuilt {
        if why == "missing" {
            tracing::info!(
                group,
                segment = first_seq,
                "journal segment had no index: rebuilt from its frames"
            );
        } else {
            tracing::warn!(
                group,
                segment = first_seq,
                "journal segment index ignored ({why}): rebuilt from its frames"
            );
        }
    }
    for e in &rec.index_errors {
        tracing::warn!(
            group,
            "journal segment index: {e} (the journal works without it)"
        );
    }
}

/// Creates a missing replica (sparse, `size` bytes, durably named) or checks the size of
/// an existing one.
pub fn prepare_replica(group: &str, d: &DiskConfig) -> anyhow::Result<()> {
    match std::fs::metadata(&d.replica) {
        Ok(m) => {
            if m.len() != d.size_bytes {
                bail!(
                    "replica {} of disk {:?} in group {group:?} is {} bytes, the config says \
                     {} bytes",
                    d.replica.display(),
                    d.id,
                    m.len(),
                    d.size_bytes
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = d
                .replica
                .parent()
                .context("a replica path has a parent directory")?;
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create replica directory {}", dir.display()))?;
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&d.replica)
                .with_context(|| format!("create replica {}", d.replica.display()))?;
            f.set_len(d.size_bytes)
                .with_context(|| format!("size replica {}", d.replica.display()))?;
            f.sync_all()
                .with_context(|| format!("sync replica {}", d.replica.display()))?;
            // The new name is durable only once its directory is synced.
            File::open(dir)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("sync directory {}", dir.display()))?;
            tracing::info!(group, disk = %d.id, replica = %d.replica.display(), size_bytes = d.size_bytes, "created replica");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("stat replica {}", d.replica.display())),
    }
}

/// Bytes of the files directly in `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    let mut total = 0u64;
    for ent in rd {
        let ent = ent.with_context(|| format!("list {}", dir.display()))?;
        let m = ent
            .metadata()
            .with_context(|| format!("stat {}", ent.path().display()))?;
        if m.is_file() {
            total = total.saturating_add(m.len());
        }
    }
    Ok(total)
}
