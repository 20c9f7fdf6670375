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
use process_server::capture::NoCapture;
use process_server::config::Config;
use process_server::nbd_server::{self, Exports};
use tracing::info;

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
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {} (nbd.listen)", config.listen))?;
    let addr = listener.local_addr().context("read the listen address")?;
    info!("listening on {addr}");
    tokio::select! {
        r = nbd_server::serve(listener, Arc::new(exports), Arc::new(NoCapture)) => {
            r.context("serve NBD")
        }
        r = tokio::signal::ctrl_c() => {
            r.context("wait for ctrl-c")?;
            info!("interrupted, shutting down");
            Ok(())
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
