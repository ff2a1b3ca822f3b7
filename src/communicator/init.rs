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
        // A closed stderr (the launcher is gone) must not panic the thread logging.
        .with_writer(crate::log::stderr)
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
                "hetccl {} configuration: {:?}",
                env!("CARGO_PKG_VERSION"),
                cfg.redacted()
            );
        }
        let discovered = Topology::gather(&cfg, boot.as_mut())?;
        let topo = match &cfg.topo_file {
            // The file replaces discovery, but only where the job can actually run it.
            Some(path) => {
                let t = Topology::load(path)?;
                t.check_placement(&discovered)?;
                t
            }
            None => {
                let mut t = discovered;
                if cfg.shm_disable {
                    t.disable_shm();
                }
                t
            }
        };
        if rank == 0 {
            for (i, node) in topo.nodes.iter().enumerate() {
                let host = &topo.ranks[node[0]].hostname;
                tracing::info!("node {i} ({host}): ranks {node:?}");
            }
        }
        let links = crate::transport::connect_all(
            &cfg,
            boot.as_mut(),
            &auth,
            &topo.same_node(rank),
            topo.oversubscribed(topo.node_of[rank]),
        )?;
        super::flight_net::start(&cfg, &auth, boot.as_mut(), &topo, rank)?;
        let mut comm = Self::from_parts(cfg, topo, rank, links, Some(boot))?;
        comm.auth = Some(auth);
        comm.pause_observing();
        if comm.cfg.topo_file.is_none() && comm.cfg.topo_probe && comm.world_size > 1 {
            comm.measure_topology()?;
        }
        if comm.world_size > 1 {
            comm.align_trace_clock()?;
            comm.start_links_on_shared_cpus()?;
            comm.restart_numbering();
        }
        comm.attach_node()?;
        comm.restart_metrics();
        // Last, after the exchanges of init, whose wake-ups can bring a host's ranks
        // together on one core (`topology::place`).
        if comm.cfg.spread {
            let host = &comm.topo.nodes[comm.topo.node_of[rank]];
            if let Some(local) = host.iter().position(|&r| r == rank) {
                crate::topology::place::spread(local, host.len());
            }
        }
        // After the placement, which moves the ranks to the cores they will run on.
        if comm.world_size > 1 {
            comm.probe_links_at_start();
        }
        if rank == 0 {
            let m = &comm.model;
            tracing::info!(
                rank,
                "topology: {}\ncost model: intra {:.1} us {:.3} GB/s, inter {:.1} us {:.3} GB/s, \
                 shard weights {:?}, inter-node parts {}",
                comm.topo
                    .table(&crate::topology::probe::used_pairs(&comm.topo)),
                m.intra.alpha * 1e6,
                m.intra.beta / 1e9,
                m.inter.alpha * 1e6,
                m.inter.beta / 1e9,
                m.shard_weights,
                match &m.inter_parts {
                    Some(p) => p.to_string(),
                    None => "equal".to_string(),
                }
            );
            if let Some(path) = &comm.cfg.topo_dump_file {
                // Only rank 0 writes, so failing here would leave the others waiting.
                match comm.topo.dump(path) {
                    Ok(()) => tracing::info!(rank, "topology written to {}", path.display()),
                    Err(e) => tracing::warn!(rank, "{e}"),
                }
            }
        }
        Ok(comm)
    }
}
