//! `master-target`: Journals replicated deltas durably, keeps replicas and recovery points, and fails back.
//!
//! The binary is thin: it parses the command line and calls into `datapath`.
//! Serving arrives with the replication issue; for now it only knows its version.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "master-target",
    version,
    about = "Journals replicated deltas durably, keeps replicas and recovery points, and fails back."
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    println!(
        "master-target {} (data path format versions: frame {}, journal {}, spool {}, bitmap {})",
        env!("CARGO_PKG_VERSION"),
        datapath::frame::VERSION,
        datapath::journal::VERSION,
        datapath::spool::VERSION,
        datapath::bitmap::VERSION,
    );
    Ok(())
}
