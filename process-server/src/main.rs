//! `process-server`: Captures writes to protected disks over NBD and ships checksummed deltas to a master target.
//!
//! The binary is thin: it parses the command line and calls into `datapath`.
//! Serving arrives with the replication issue; for now it only knows its version.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "process-server",
    version,
    about = "Captures writes to protected disks over NBD and ships checksummed deltas to a master target."
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    println!(
        "process-server {} (data path format versions: frame {}, journal {}, spool {}, bitmap {})",
        env!("CARGO_PKG_VERSION"),
        datapath::frame::VERSION,
        datapath::journal::VERSION,
        datapath::spool::VERSION,
        datapath::bitmap::VERSION,
    );
    Ok(())
}
