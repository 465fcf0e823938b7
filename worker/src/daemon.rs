//! `worker join`: the volunteer's daemon.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Arguments of `worker join`.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// The coordinator's ticket (`peergrid1:<node-id>@<host:port>`), from its `ticket` file.
    pub ticket: String,
    /// Where the worker keeps its identity, blobs, compile cache and unsent results.
    #[arg(long, default_value = "peergrid-worker")]
    pub data_dir: PathBuf,
    /// Tasks to run at once (default: the cores this process may use).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Address for serving blobs to peers (default: an ephemeral port on all interfaces).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Only compute while the machine is otherwise idle; pause tasks when it is busy.
    #[arg(long)]
    pub idle_only: bool,
    /// Use at most this percentage of each slot's CPU time (duty-cycle throttling).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub cpu_limit: Option<u8>,
}

/// Run the worker until `shutdown` resolves.
pub async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("`worker join` is not implemented yet")
}
