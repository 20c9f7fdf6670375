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
    /// to its backing file or device. Logs go to stderr; set the level with RUST_LOG
    /// (default info).
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
    /// Show the running server's groups (state, epoch, spool) and disks (NBD URI,
    /// backing path, dirty blocks).
    Status {
        /// The running server's TOML config file (names its state_dir).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
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

fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn serve(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let exports = Exports::open(&config)
        .with_context(|| format!("open the disks of {}", config_path.display()))?;
    for e in exports.iter() {
        info!(group = %e.group, disk = %e.id, size_bytes = e.size_bytes, "export ready");
    }
    let (tracking, reports) = Tracking::open(&exports, &config.tracking)?;
    tracking::log_open_reports(&reports, &config.tracking.state_dir);
    let tracking = Arc::new(tracking);
    let shipper = match &config.target {
        Some(target) => {
            let s = Shipper::new(target.clone(), &tracking, &config.tracking.state_dir)
                .with_context(|| format!("config file {}", config_path.display()))?;
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
    let control_listener = control::bind(&control::socket_path(&config))?;
    let control_server = control::serve(
        control_listener,
        Arc::new(control::Control {
            tracking: tracking.clone(),
            exports: exports.clone(),
            hooks: config
                .groups
                .iter()
                .map(|g| (g.id.clone(), g.hooks.clone()))
                .collect(),
            nbd_addr: addr,
        }),
    );
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
    let result = tokio::select! {
        r = nbd_server::serve(listener, exports.clone(), tracking.clone()) => {
            r.context("serve NBD")
        }
        r = control_server => r,
        _ = cutter => Ok(()),
        _ = stop.recv() => {
            info!("stopping");
            Ok(())
        }
    };
    if let Some(s) = shipper {
        // Stop shipping before tracking closes; an ack being handled has written its
        // state before it releases the spool, so stopping anywhere is safe.
        s.abort();
        let _ = s.await;
    }
    let t = tracking.clone();
    tokio::task::spawn_blocking(move || t.shutdown())
        .await
        .context("join the shutdown")?
        .context("shut change tracking down cleanly")?;
    info!("change tracking closed cleanly");
    let _ = std::fs::remove_file(control::socket_path(&config));
    result
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
    for g in answer["groups"].as_array().into_iter().flatten() {
        println!(
            "group {}: {} (epoch {}, spool {} of {} bytes){}",
            g["id"].as_str().unwrap_or_default(),
            g["state"].as_str().unwrap_or_default(),
            g["epoch"],
            g["spool_bytes"],
            g["spool_bytes_max"],
            g["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    for d in answer["disks"].as_array().into_iter().flatten() {
        println!(
            "  disk {} ({} bytes) {} -> {}, dirty blocks {}",
            d["id"].as_str().unwrap_or_default(),
            d["size_bytes"],
            d["nbd_uri"].as_str().unwrap_or_default(),
            d["path"].as_str().unwrap_or_default(),
            d["dirty_blocks"]
        );
    }
    Ok(())
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
        Some(Cmd::Serve { config }) => {
            init_logging();
            tokio::runtime::Runtime::new()
                .context("start the tokio runtime")
                .and_then(|rt| rt.block_on(serve(config)))
        }
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
