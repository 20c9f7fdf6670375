//! `process-server`: Captures writes to protected disks over NBD and ships checksummed deltas to a master target.
//!
//! The binary is thin: it parses the command line and the config, then calls
//! [`process_server::nbd_server::serve`]. Without a subcommand it prints its version
//! and the data path format versions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use process_server::config::Config;
use process_server::control;
use process_server::metrics;
use process_server::nbd_server::{self, Exports};
use process_server::shipper::Shipper;
use process_server::tracking::{self, Tracking};
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(
    name = "process-server",
    version,
    about = "Captures writes to protected disks over NBD and ships checksummed deltas to a master target."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve every configured disk over NBD (export name = disk id), writing through
    /// to its backing file or device. Logs go to stderr; the level is RUST_LOG when
    /// set, else the config's log_level (default info).
    Serve {
        /// The TOML config file; relative paths in it are resolved against its directory.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Cut a recovery point of a group now, on the running server; prints its id.
    /// With --app-consistent the group's freeze hook runs first and its thaw hook
    /// after (always); a freeze that fails or times out gives a crash-consistent point
    /// and a warning.
    Tag {
        /// The running server's TOML config file (names its state_dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The group to cut.
        #[arg(long, value_name = "G")]
        group: String,
        /// Quiesce applications with the group's freeze/thaw hooks around the cut.
        #[arg(long)]
        app_consistent: bool,
        /// Print a JSON object instead of the id.
        #[arg(long)]
        json: bool,
    },
    /// Show the running server's groups (state, epoch, RPO, spool fill, capture and
    /// shipping throughput) and disks (state, NBD URI, backing path, dirty blocks,
    /// bytes captured).
    Status {
        /// The running server's TOML config file (names its state_dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a disk's change list: the blocks whose writes the master target has not
    /// acknowledged (its dirty bitmap), for a reprotect in the other direction after a
    /// failback there (`initial_sync_changed` of the other site's process server).
    /// Offline: refused while `serve` runs with this config. Run it after this process
    /// server stopped for good.
    Changed {
        /// The process server's TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The disk.
        #[arg(long, value_name = "D")]
        disk: String,
        /// Where the list goes (replaced durably if it exists).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare a disk with the master target's copy at its newest consistent point, by
    /// 64 KiB block hashes, while both run (an online verify); prints the ranges that
    /// differ. Blocks changed since the last acknowledged point are reported as in
    /// flight, not compared. Exit status 0: no difference; 2: differences; 1: error.
    Verify {
        /// The running server's TOML config file (names its state_dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The disk to verify.
        #[arg(long, value_name = "D")]
        disk: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_versions() {
    println!(
        "process-server {} (data path format versions: frame {}, journal {}, spool {}, bitmap {})",
        env!("CARGO_PKG_VERSION"),
        datapath::frame::VERSION,
        datapath::journal::VERSION,
        datapath::spool::VERSION,
        datapath::bitmap::VERSION,
    );
}

/// Logs to stderr: `RUST_LOG` when set, else the config's `log_level`.
fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn serve(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    // Held until the process ends: no second server and no offline command opens this
    // state meanwhile.
    let _state_lock = tracking::StateLock::acquire(&config.tracking.state_dir)?;
    let exports = Exports::open(&config)
        .with_context(|| format!("open the disks of {}", config_path.display()))?;
    for e in exports.iter() {
        info!(group = %e.group, disk = %e.id, size_bytes = e.size_bytes, "export ready");
    }
    let (tracking, reports) = Tracking::open(&exports, &config)?;
    tracking::log_open_reports(&reports, &config.tracking.state_dir);
    let tracking = Arc::new(tracking);
    let mut hash_broker = None;
    let shipper = match &config.target {
        Some(target) => {
            let s = Shipper::new(target.clone(), &tracking, &config.tracking.state_dir)
                .with_context(|| format!("config file {}", config_path.display()))?;
            hash_broker = Some(s.hashes());
            let transport = if target.tls.is_some() {
                "TLS 1.3"
            } else {
                "plain TCP"
            };
            info!(target = %target.address, node = %target.node, transport, "shipping to the master target");
            Some(tokio::spawn(Arc::new(s).run()))
        }
        None => {
            info!("no [target] configured: nothing is shipped");
            None
        }
    };
    // The handlers are installed before the server says it listens: a SIGTERM right
    // after that line must close tracking cleanly, not kill the process.
    let mut stop = StopSignals::install()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {} (nbd.listen)", config.listen))?;
    let addr = listener.local_addr().context("read the listen address")?;
    let exports = Arc::new(exports);
    let metrics_listener = match config.metrics {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("listen on {a} (metrics)"))?;
            Some(l)
        }
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().context("read the metrics address")?),
        None => None,
    };
    let control_listener = control::bind(&control::socket_path(&config))?;
    let control = Arc::new(control::Control {
        tracking: tracking.clone(),
        exports: exports.clone(),
        hooks: config
            .groups
            .iter()
            .map(|g| (g.id.clone(), g.hooks.clone()))
            .collect(),
        nbd_addr: addr,
        shipping: config.target.is_some(),
        metrics_addr,
        hashes: hash_broker.clone(),
    });
    let control_server = control::serve(control_listener, control.clone());
    let app_schedule = app_consistent_schedule(&config, control.clone());
    let sampler = tokio::spawn(tracking.metrics().clone().sample_forever());
    let metrics_server = metrics_listener.map(|l| {
        let t = tracking.clone();
        let shipping = config.target.is_some();
        let render: metrics::Render =
            Arc::new(move || Ok(metrics::render(t.metrics(), &t, shipping)));
        tokio::spawn(metrics::serve_http(l, render))
    });
    if let Some(a) = metrics_addr {
        // Not phrased "listening on": that line names the NBD address.
        info!("metrics at http://{a}/metrics");
    }
    info!("listening on {addr}");
    let cutter = {
        let tracking = tracking.clone();
        let every = std::time::Duration::from_millis(config.tracking.cut_interval_ms);
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let t = tracking.clone();
                let cuts = tokio::task::spawn_blocking(move || t.cut_all(false)).await;
                for (group, r) in cuts.unwrap_or_default() {
                    match r {
                        Ok(Some(p)) => {
                            tracing::debug!(
                                group,
                                point = p.point_id,
                                spool_seq = p.spool_seq,
                                "cut"
                            )
                        }
                        Ok(None) => {}
                        Err(e) => error!(group, "cut failed: {e:#}"),
                    }
                }
            }
        }
    };
    let resync_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let resyncs = if config.target.is_some() {
        process_server::resync::spawn_all(
            tracking.clone(),
            exports.clone(),
            resync_stop.clone(),
            process_server::resync::HashDiff {
                enabled: config.tracking.hash_diff,
                broker: hash_broker.clone(),
            },
        )
    } else {
        Vec::new()
    };
    let result = tokio::select! {
        r = nbd_server::serve(listener, exports.clone(), tracking.clone()) => {
            r.context("serve NBD")
        }
        r = control_server => r,
        _ = cutter => Ok(()),
        _ = app_schedule => Ok(()),
        _ = stop.recv() => {
            info!("stopping");
            Ok(())
        }
    };
    sampler.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if let Some(s) = shipper {
        // Stop shipping before tracking closes; an ack being handled has written its
        // state before it releases the spool, so stopping anywhere is safe.
        s.abort();
        let _ = s.await;
    }
    resync_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::task::spawn_blocking(move || {
        for h in resyncs {
            let _ = h.join();
        }
    })
    .await
    .context("join the resync")?;
    let t = tracking.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .context("join the shutdown")?
        .context("shut change tracking down cleanly")?;
    info!("change tracking closed cleanly");
    let _ = std::fs::remove_file(control::socket_path(&config));
    result
}

/// Runs every group's scheduled app-consistent points (`app_consistent_interval_s`):
/// freeze hook, cut, thaw hook, as `tag --app-consistent` does. Never returns.
async fn app_consistent_schedule(config: &Config, control: Arc<control::Control>) {
    let mut tasks = tokio::task::JoinSet::new();
    for g in &config.groups {
        let Some(every_s) = g.app_consistent_interval_s else {
            continue;
        };
        let (group, control) = (g.id.clone(), control.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(every_s));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (c, g) = (control.clone(), group.clone());
                let answer = tokio::task::spawn_blocking(move || control::tag(&c, &g, true)).await;
                match answer {
                    Ok(a) if a["ok"] == true => {}
                    Ok(a) => tracing::warn!(
                        group,
                        "scheduled app-consistent point: {}",
                        a["error"].as_str().unwrap_or("refused")
                    ),
                    Err(e) => error!(group, "scheduled app-consistent point: {e}"),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    std::future::pending::<()>().await
}

/// `tag`: asks the running server for a point.
fn tag(config: PathBuf, group: String, app: bool, as_json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(&config)?;
    let answer = control::request(
        &control::socket_path(&cfg),
        &serde_json::json!({"cmd": "tag", "group": group, "app_consistent": app}),
    )?;
    for w in answer["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    if answer["ok"] != true {
        anyhow::bail!(
            "group {group}: {}",
            answer["error"].as_str().unwrap_or("refused")
        );
    }
    if as_json {
        println!("{}", answer["point"]);
    } else {
        println!("{}", answer["point"]["id"]);
    }
    Ok(())
}

/// `changed`: a disk's unacknowledged writes as a change list.
fn changed(config: PathBuf, disk: String, out: PathBuf, as_json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(&config)?;
    let w = process_server::changed::run(&cfg, &disk, &out)?;
    if as_json {
        println!("{}", serde_json::to_string(&w).context("encode JSON")?);
    } else {
        print!("{}", process_server::changed::text(&w));
    }
    Ok(())
}

/// `status`: the running server's groups and disks.
fn status(config: PathBuf, as_json: bool) -> anyhow::Result<()> {
    let cfg = Config::load(&config)?;
    let answer = control::request(
        &control::socket_path(&cfg),
        &serde_json::json!({"cmd": "status"}),
    )?;
    if answer["ok"] != true {
        anyhow::bail!("{}", answer["error"].as_str().unwrap_or("refused"));
    }
    if as_json {
        let mut a = answer;
        if let Some(o) = a.as_object_mut() {
            o.remove("ok");
        }
        println!("{a}");
        return Ok(());
    }
    print!("{}", status_table(&answer));
    Ok(())
}

/// `verify`: the running server compares a disk with the master target's copy.
/// Returns whether differences were found.
fn verify(config: PathBuf, disk: String, as_json: bool) -> anyhow::Result<bool> {
    let cfg = Config::load(&config)?;
    let answer = control::request(
        &control::socket_path(&cfg),
        &serde_json::json!({"cmd": "verify", "disk": disk}),
    )?;
    if answer["ok"] != true {
        anyhow::bail!("{}", answer["error"].as_str().unwrap_or("refused"));
    }
    let v = &answer["verify"];
    let differing = v["differing_blocks"].as_u64().unwrap_or(0);
    if as_json {
        println!("{v}");
        return Ok(differing > 0);
    }
    let num = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let points: Vec<String> = v["points"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p.as_u64() {
            Some(0) | None => "replica".to_string(),
            Some(id) => format!("point {id}"),
        })
        .collect();
    println!(
        "disk {} (group {}, {} bytes) against the master target's {}: {} blocks ({} bytes) \
         compared in {:.1} s",
        v["disk"].as_str().unwrap_or("-"),
        v["group"].as_str().unwrap_or("-"),
        num(&v["size_bytes"]),
        points.join(", "),
        num(&v["compared_blocks"]),
        num(&v["compared_bytes"]),
        v["seconds"].as_f64().unwrap_or(0.0),
    );
    let ranges = |x: &serde_json::Value| -> Vec<String> {
        x.as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{}+{}", num(&r["offset"]), num(&r["len"])))
            .collect()
    };
    println!(
        "in flight, not compared: {} blocks {}",
        num(&v["in_flight_blocks"]),
        ranges(&v["in_flight"]).join(" ")
    );
    if differing == 0 {
        println!("differing: none");
    } else {
        println!(
            "DIFFERING: {differing} blocks: {}",
            ranges(&v["differing"]).join(" ")
        );
    }
    Ok(differing > 0)
}

/// The human form of a status answer.
fn status_table(answer: &serde_json::Value) -> String {
    use std::fmt::Write;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let num = |v: &serde_json::Value| v.as_u64().map_or("-".into(), |n| n.to_string());
    let rate = |v: &serde_json::Value| v.as_f64().map_or("-".into(), human_rate);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<13} {:>8} {:>10} {:>23} {:>12} {:>12}",
        "GROUP", "STATE", "EPOCH", "RPO", "SPOOL (BYTES)", "CAPTURE", "SHIP"
    );
    for g in answer["groups"].as_array().into_iter().flatten() {
        let rpo = g["rpo_ms"]
            .as_u64()
            .map_or("none".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let _ = writeln!(
            out,
            "{:<16} {:<13} {:>8} {:>10} {:>23} {:>12} {:>12}",
            text(&g["id"]),
            text(&g["state"]),
            num(&g["epoch"]),
            rpo,
            format!("{}/{}", num(&g["spool_bytes"]), num(&g["spool_bytes_max"])),
            rate(&g["capture_bytes_per_s"]),
            rate(&g["ship_bytes_per_s"]),
        );
        if let Some(r) = g["reason"].as_str() {
            let _ = writeln!(out, "  {}: {r}", text(&g["id"]));
        }
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:<16} {:<13} {:>12} {:>14}  {:<32} PATH",
        "DISK", "GROUP", "STATE", "DIRTY BLOCKS", "CAPTURED", "NBD URI"
    );
    for d in answer["disks"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<13} {:>12} {:>14}  {:<32} {}",
            text(&d["id"]),
            text(&d["group"]),
            text(&d["state"]),
            num(&d["dirty_blocks"]),
            num(&d["captured_bytes"]),
            text(&d["nbd_uri"]),
            text(&d["path"]),
        );
    }
    if let Some(m) = answer["metrics"].as_str() {
        let _ = writeln!(out, "\nmetrics: http://{m}/metrics");
    }
    out
}

/// Bytes per second in binary units: `0 B/s`, `12.3 MiB/s`.
fn human_rate(bytes_per_s: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = bytes_per_s.max(0.0);
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// SIGINT and SIGTERM, listened for from the moment they are installed.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
        })
    }

    /// Resolves on the first SIGINT or SIGTERM.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => {
            print_versions();
            Ok(())
        }
        Some(Cmd::Tag {
            config,
            group,
            app_consistent,
            json,
        }) => tag(config, group, app_consistent, json),
        Some(Cmd::Status { config, json }) => status(config, json),
        Some(Cmd::Changed {
            config,
            disk,
            out,
            json,
        }) => changed(config, disk, out, json),
        Some(Cmd::Verify { config, disk, json }) => match verify(config, disk, json) {
            Ok(true) => return ExitCode::from(2),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        },
        Some(Cmd::Serve { config }) => Config::load(&config).and_then(|cfg| {
            init_logging(&cfg.log_level);
            tokio::runtime::Runtime::new()
                .context("start the tokio runtime")
                .and_then(|rt| rt.block_on(serve(config, cfg)))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole context chain, no backtrace: these are
            // operator errors (bad config, port in use), not bugs.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
