//! The retention fold of each group, wired to the server: which journal it runs on,
//! when, and what it tells the log, `status` and `/metrics`. The fold itself (which
//! point, bounded steps, the order of durable steps, why a crash loses nothing, pins) is
//! [`datapath::retention`].
//!
//! # Who runs it
//!
//! A group's [`Journal`] belongs to whoever holds the group's slot (see
//! [`crate::server`]). So the fold runs in two places, never both at once:
//!
//! - **idle**: a background task per group ticks every `retention_check_interval_ms`;
//!   when no connection holds the group it takes the journal out of the slot (marked as
//!   folding, so that a connection's claim waits for it) for one bounded step at a time,
//!   and goes on while the fold has a backlog, giving the slot back between steps;
//! - **replicating**: the connection that holds the group runs one step between two
//!   batches, after it sent the acks of the first, when [`GroupRetention::due`] says so:
//!   once per interval, or at once again while the fold has a backlog. A step folds at
//!   most [`datapath::retention::FOLD_BYTES_MAX_DEFAULT`] bytes of frames, a fraction of a
//!   second, so acks are never held up for longer.
//!
//! Both run on the blocking pool. At start, before the server listens,
//! [`GroupRetention::finish_interrupted`] finishes a fold a crash interrupted, so nothing
//! ever sees a replica past its base.
//!
//! # What it reports
//!
//! | event                                   | log                     | status / metrics                     |
//! |-----------------------------------------|-------------------------|--------------------------------------|
//! | a step folded frames                    | info, with MB/s         | `base_seq`, `points`; `blockrep_folded_bytes_total` |
//! | points dropped for space (byte limit)   | warn: how many, the newest's time | `journal_warning`; `blockrep_points_dropped_for_space_total` |
//! | the journal crosses 80% of its limit    | warn, once per crossing | `journal_warning`; `blockrep_journal_bytes` vs `blockrep_journal_bytes_max` |
//! | a step failed (replica I/O, a bad frame) | error; retried next interval | the base does not move          |
//!
//! # A failpoint for tests
//!
//! With `BLOCKREP_FAILPOINT=retention::before_sync` in its environment, the server's
//! first fold step stops after it wrote the replicas and before it syncs them, logs
//! `failpoint retention::before_sync reached`, and waits there for ever: the test then
//! kills it (-9) and checks that a restart loses nothing. Unset, it costs one `Option`
//! check per replica sync.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use datapath::frame::Decoder;
use datapath::journal::Journal;
use datapath::retention::{self, FoldReport, Pins, Reason, Replica, RetentionError};
use datapath::storage::{OpenMode, RealFs, Storage, StorageFile};

use crate::config::GroupConfig;
use crate::failpoint::HeldSync;
use crate::metrics::GroupMetrics;
use crate::timefmt::{now_unix_ms, rfc3339_ms};

/// The environment variable naming a failpoint (tests only; see the module doc).
pub const FAILPOINT_ENV: &str = "BLOCKREP_FAILPOINT";
/// The one failpoint: stop before the first replica sync of a fold.
pub const FAILPOINT_BEFORE_SYNC: &str = "retention::before_sync";

/// One group's fold: its policy, its pins, and when it last ran.
pub struct GroupRetention {
    cfg: GroupConfig,
    /// Points in use (failback, export): the fold stops short of them.
    pub pins: Arc<Pins>,
    metrics: Arc<GroupMetrics>,
    run: Mutex<RunState>,
    /// Set once the failpoint was reached (it fires once per process).
    failpoint: Option<AtomicBool>,
}

#[derive(Default)]
struct RunState {
    last_run: Option<Instant>,
    /// The last step did not reach its target: run again without waiting.
    backlog: bool,
    /// The journal was at or above 80% of its limit at the last look.
    near_limit: bool,
}

impl GroupRetention {
    /// The fold of group `cfg`, publishing to `metrics`.
    pub fn new(cfg: &GroupConfig, metrics: Arc<GroupMetrics>) -> Self {
        let failpoint = std::env::var(FAILPOINT_ENV)
            .ok()
            .filter(|v| v == FAILPOINT_BEFORE_SYNC)
            .map(|_| AtomicBool::new(false));
        Self {
            cfg: cfg.clone(),
            pins: Pins::new(),
            metrics,
            run: Mutex::new(RunState::default()),
            failpoint,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        // Timestamps and flags: whole after any panic elsewhere.
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How often the background task looks.
    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.cfg.retention_check_interval_ms)
    }

    /// Whether the holder of the journal should run a step now: the interval passed
    /// since the last one, or the last one left a backlog.
    pub fn due(&self) -> bool {
        let s = self.state();
        s.backlog
            || s.last_run
                .is_none_or(|t| t.elapsed() >= self.check_interval())
    }

    /// Finishes a fold a crash interrupted (see [`retention::finish_interrupted`]). Run
    /// at start, before anything reads the replicas.
    pub fn finish_interrupted(&self, j: &mut Journal) -> anyhow::Result<()> {
        let mut dec = Decoder::new();
        let started = Instant::now();
        let r = self
            .with_replicas(|reps| retention::finish_interrupted(j, reps, &self.pins, &mut dec))
            .with_context(|| {
                format!(
                    "group {:?}: finish the retention fold a crash interrupted",
                    self.cfg.id
                )
            })?;
        if let Some(r) = r {
            self.report(&r, started.elapsed());
            self.metrics.publish(j);
        }
        Ok(())
    }

    /// Runs one bounded fold step on `j` (the caller holds it), then logs and publishes.
    /// Returns whether the fold has a backlog (call again soon). Errors are logged: the
    /// next step retries, and nothing is lost meanwhile.
    pub fn step(&self, j: &mut Journal) -> bool {
        let policy = self.cfg.retention_policy();
        // Near the limit is judged on the journal as the step finds it: a fold for
        // space brings it down again, and the warning must come before that.
        self.check_near_limit(j.bytes());
        let started = Instant::now();
        let mut dec = Decoder::new();
        let now = now_unix_ms();
        let r = self.with_replicas(|reps| {
            retention::fold_step(j, reps, &self.pins, &policy, now, &mut dec)
        });
        let backlog = match r {
            Ok(Some(r)) => {
                self.report(&r, started.elapsed());
                self.metrics.publish(j);
                !r.done
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(group = %self.cfg.id, "retention fold failed (retried in {} ms; nothing is lost): {e:#}", self.cfg.retention_check_interval_ms);
                false
            }
        };
        {
            let mut s = self.state();
            s.last_run = Some(Instant::now());
            s.backlog = backlog;
        }
        self.check_near_limit(j.bytes());
        backlog
    }

    /// Warns once each time the journal crosses [`retention::NEAR_LIMIT_PERCENT`] of its
    /// limit upwards.
    fn check_near_limit(&self, bytes: u64) {
        let near = retention::near_limit(bytes, self.cfg.journal_bytes_max);
        let mut s = self.state();
        if near && !s.near_limit {
            tracing::warn!(
                group = %self.cfg.id,
                journal_bytes = bytes,
                journal_bytes_max = self.cfg.journal_bytes_max,
                "journal at {}% of journal_bytes_max: beyond the limit the oldest points will be \
                 dropped for space (raise journal_bytes_max or shorten retention)",
                u128::from(bytes) * 100 / u128::from(self.cfg.journal_bytes_max.max(1))
            );
        } else if !near && s.near_limit {
            tracing::debug!(group = %self.cfg.id, journal_bytes = bytes, "journal back below the warning level of journal_bytes_max");
        }
        s.near_limit = near;
    }

    /// Logs a step and counts it.
    fn report(&self, r: &FoldReport, took: Duration) {
        let secs = took.as_secs_f64().max(1e-6);
        let mb_per_s = r.frame_bytes as f64 / 1e6 / secs;
        tracing::info!(
            group = %self.cfg.id,
            reason = ?r.reason,
            from_seq = r.from_seq,
            through_seq = r.through_seq,
            target_point = r.target.as_ref().map(|p| p.record.point_id),
            frames = r.frames,
            frame_bytes = r.frame_bytes,
            written_bytes = r.written_bytes,
            points_dropped = r.points_dropped,
            segments_removed = r.segments_removed,
            done = r.done,
            took_ms = took.as_millis() as u64,
            "retention fold: {:.1} MB/s of frames",
            mb_per_s
        );
        if r.space_points_dropped > 0 {
            let newest = r
                .newest_space_dropped_time_unix_ms
                .map(rfc3339_ms)
                .unwrap_or_default();
            tracing::warn!(
                group = %self.cfg.id,
                points = r.space_points_dropped,
                newest_dropped = %newest,
                journal_bytes_max = self.cfg.journal_bytes_max,
                "journal over journal_bytes_max: dropped {} points younger than the retention \
                 window, the newest from {newest}",
                r.space_points_dropped
            );
        }
        if r.reason == Reason::Space && !r.fits {
            tracing::warn!(group = %self.cfg.id, "journal still over journal_bytes_max: pinned points (a failback or an export) keep the rest");
        }
        self.metrics.folded(r);
    }

    /// Opens every replica of the group and calls `f` with them.
    fn with_replicas<T>(
        &self,
        f: impl FnOnce(&[Replica<'_>]) -> Result<T, RetentionError>,
    ) -> anyhow::Result<T> {
        let mut files: Vec<Box<dyn StorageFile + '_>> = Vec::with_capacity(self.cfg.disks.len());
        for d in &self.cfg.disks {
            let file = RealFs
                .open(&d.replica, OpenMode::Existing)
                .with_context(|| {
                    format!("open replica {} of disk {:?}", d.replica.display(), d.id)
                })?;
            files.push(match &self.failpoint {
                // The first sync of any replica stops the process for a kill (see
                // the module doc).
                Some(fired) => Box::new(HeldSync {
                    inner: file,
                    hold: Box::new(|| !fired.swap(true, Ordering::SeqCst)),
                    what: FAILPOINT_BEFORE_SYNC,
                    file: d.replica.display().to_string(),
                }),
                None => file,
            });
        }
        let reps: Vec<Replica<'_>> = self
            .cfg
            .disks
            .iter()
            .zip(&files)
            .map(|(d, f)| Replica {
                disk: &d.id,
                file: f.as_ref(),
                size_bytes: d.size_bytes,
            })
            .collect();
        Ok(f(&reps)?)
    }
}
