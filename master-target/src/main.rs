//! `master-target`: Journals replicated deltas durably, keeps replicas and recovery points, and fails back.
//!
//! The binary is thin: it parses the command line and the config, then calls into
//! [`server`] (the receiver), [`query`] (points and status) or [`failback`] (failback
//! and commit), which wire `datapath`'s frame codec, journal and failback to the
//! network and the terminal.
//!
//! | module     | owns                                                          |
//! |------------|---------------------------------------------------------------|
//! | [`config`] | the TOML config file                                          |
//! | [`store`]  | files per group and disk, and the group lock                  |
//! | [`reader`] | cutting the byte stream into frames with bounded memory        |
//! | [`server`] | the receiver protocol: hello, verify, journal, group commit, ack |
//! | [`retention`] | the retention fold per group: who runs it, when, what it reports |
//! | [`hashes`] | hash lists for a process server's resync and verify (protocol 3) |
//! | [`tls`]    | TLS 1.3 with client certificates: server config, client names  |
//! | [`certs`]  | `certs`: a deployment's CA, server and client certificates     |
//! | [`metrics`] | live counters, throughput, state names, the `/metrics` endpoint |
//! | [`control`] | the control socket `status`, `points`, `failback`, `commit` and `export` ask a running server |
//! | [`query`]  | `points` and `status`, live or from the files on disk         |
//! | [`failback`] | `failback` and `commit`: point specs, summary, live or in-process |
//! | [`export`] | `export` (test failover): a point served over NBD, live or in-process |
//! | [`timefmt`] | RFC 3339 times: formatting, and parsing with offsets          |

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod certs;
mod config;
mod control;
mod export;
mod failback;
mod failpoint;
mod hashes;
mod metrics;
mod query;
mod reader;
mod retention;
mod server;
mod store;
mod timefmt;
mod tls;

#[derive(Parser, Debug)]
#[command(
    name = "master-target",
    version,
    about = "Journals replicated deltas durably, keeps replicas and recovery points, and fails back."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Receive frames from process servers and journal them: TLS 1.3 with client
    /// certificates when the config has [tls], else plain TCP on loopback. Prints
    /// `listening on ADDR` once it accepts connections.
    Serve {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// List a group's durable recovery points, oldest first (asks the running server,
    /// or reads the journal when none runs). Points older than the group's `retention`
    /// are folded into the replicas and no longer listed.
    Points {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// Print a JSON array of {id, time, time_unix_ms, kind, consistent, seq}.
        #[arg(long)]
        json: bool,
    },
    /// Show per group the state, peer, durable seq, points, RPO, journal size (with its
    /// limit and a warning near it), retention and receive throughput, and per disk its replica and state (live from the running
    /// server, or read from disk when none runs: then "running": false).
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Fail a group back to a recovery point: replication of the group stops, and the
    /// journal through the point is applied to every replica of the group with an undo
    /// log (so the point can still be changed), synced and re-read against its blake3.
    /// Asks the running server, or works on the files when none runs. Run it again
    /// after a crash or kill: the result is exact. Run it with another --point to change
    /// the point (until `commit`).
    Failback {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// latest (ask the process server to cut and drain first), latest-processed,
        /// latest-app, a point id, or an RFC 3339 time (the newest consistent point at
        /// or before it), e.g. 2026-11-27T10:00:00Z or 2026-11-27T11:00:00+01:00.
        #[arg(long, value_name = "SPEC")]
        point: String,
        /// Print the summary as a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make a group's failback final: first, per disk, a change list of the journal
    /// frames after the point is written to DATA_DIR/GROUP/changed-since-point/DISK.chg
    /// (the blocks the other site wrote after it, for a reprotect that compares only
    /// those); then its undo logs and journal are dropped; the group is then "failed
    /// back, not protected" (replication refused until reprotect).
    Commit {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make the certificates of a new deployment (TLS between process servers and the
    /// master target) in a new directory. Nothing is overwritten.
    ///
    /// Writes into DIR:
    ///   ca.pem                       -> the master target ([tls] ca) and every process
    ///                                   server ([target] ca)
    ///   ca.key                       -> no server: keep it offline
    ///   master-target.pem, .key      -> the master target ([tls] cert, key)
    ///   process-server-NODE.pem, .key -> process server NODE ([target] cert, key; its
    ///                                   [target] node must be NODE)
    ///
    /// The master target's certificate names localhost, 127.0.0.1, ::1 and every
    /// --master-target-name; a process server's [target] server_name (default: the IP
    /// of its address) must be one of them. Keys are written with mode 0600.
    #[command(verbatim_doc_comment)]
    Certs {
        /// The directory to write to (created if missing; files in it are never
        /// overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Another name of the master target for its certificate: a DNS name or an IP
        /// address that process servers connect to (repeatable).
        #[arg(long = "master-target-name", value_name = "NAME")]
        master_target_names: Vec<String>,
        /// A process server's node id: it gets a client certificate for that node
        /// (repeatable, at least one).
        #[arg(long = "process-server", value_name = "NODE", required = true)]
        nodes: Vec<String>,
    },
    /// Test failover: serve every disk of a group as it was at a point over NBD
    /// (export name = disk id), without touching the replicas and without stopping
    /// replication (the running server serves it; with none running, this process
    /// does). Writes go to a throwaway overlay, removed when the export ends (SIGINT or
    /// SIGTERM). Prints `listening on ADDR` once ready. While it runs, a failback of the
    /// group is refused and retention keeps the point.
    Export {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        group: String,
        /// latest or latest-processed (the newest consistent point; no cut is asked),
        /// latest-app, a point id, or an RFC 3339 time (the newest consistent point at
        /// or before it).
        #[arg(long, value_name = "SPEC")]
        point: String,
        /// Where to serve NBD (port 0: any free port).
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
    },
    /// Print the versions of the formats this build reads and writes.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let init_logging = |level: &str| {
        // RUST_LOG when set, else the config's log_level.
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .init();
    };
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        init_logging("info");
    }
    match cli.cmd {
        Cmd::Serve { config } => {
            let cfg = config::Config::load(&config)?;
            init_logging(&cfg.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(server::run(cfg))
        }
        Cmd::Points {
            config,
            group,
            json,
        } => query::points(&config::Config::load(&config)?, &group, json),
        Cmd::Status { config, json } => query::status(&config::Config::load(&config)?, json),
        Cmd::Export {
            config,
            group,
            point,
            listen,
        } => export::export_cmd(&config::Config::load(&config)?, &group, &point, listen),
        Cmd::Failback {
            config,
            group,
            point,
            json,
        } => failback::failback_cmd(&config::Config::load(&config)?, &group, &point, json),
        Cmd::Commit {
            config,
            group,
            json,
        } => failback::commit_cmd(&config::Config::load(&config)?, &group, json),
        Cmd::Certs {
            out,
            master_target_names,
            nodes,
        } => {
            for w in certs::generate(&out, &master_target_names, &nodes)? {
                println!("{}  -> {}", w.path.display(), w.goes_to);
            }
            Ok(())
        }
        Cmd::Version => {
            println!(
                "master-target {} (data path format versions: frame {}, protocol {}, journal {}, failback state {}, undo log {})",
                env!("CARGO_PKG_VERSION"),
                datapath::frame::VERSION,
                datapath::frame::PROTOCOL_VERSION,
                datapath::journal::VERSION,
                datapath::failback::VERSION,
                datapath::apply::VERSION,
            );
            Ok(())
        }
    }
}
