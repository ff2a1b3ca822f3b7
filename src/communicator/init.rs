//! Creating a communicator from the environment: configuration, bootstrap, topology, links.

use super::Communicator;
use crate::config::Config;
use crate::error::Result;
use crate::topology::Topology;

/// Installs a `tracing` subscriber at `HETCCL_DEBUG`'s level, unless the program
/// installed its own.
fn init_logging(cfg: &Config) {
    use crate::config::LogLevel;
    let level = match cfg.debug {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "hetccl={level}"
        )))
        .try_init();
}

impl Communicator {
    /// Reads the configuration from the environment, finds the other ranks (launcher,
    /// torchrun variables, MPI, or a shared directory) and connects to them.
    pub fn init_from_env() -> Result<Self> {
        Self::init(Config::from_env()?)
    }

    /// Like [`Communicator::init_from_env`] with an explicit configuration.
    pub fn init(cfg: Config) -> Result<Self> {
        init_logging(&cfg);
        let (mut boot, auth) = crate::bootstrap::from_config(&cfg)?;
        let rank = boot.rank();
        if rank == 0 {
            tracing::info!(
                "hetccl {} configuration: {cfg:?}",
                env!("CARGO_PKG_VERSION")
            );
        }
        let topo = Topology::gather(&cfg, boot.as_mut())?;
        if rank == 0 {
            for (i, node) in topo.nodes.iter().enumerate() {
                let host = &topo.ranks[node[0]].hostname;
                tracing::info!("node {i} ({host}): ranks {node:?}");
            }
        }
        let links =
            crate::transport::connect_all(&cfg, boot.as_mut(), &auth, &topo.same_node(rank))?;
        Self::from_parts(cfg, topo, rank, links, Some(boot))
    }
}
