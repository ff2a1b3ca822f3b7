//! Typed settings, read from the environment once.
//!
//! Nothing else in the crate reads environment variables: everything goes through
//! [`Config::from_env`], which snapshots the environment and validates every value,
//! naming the variable and the accepted values when one is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::dtype::WireFormat;
use crate::error::{Error, Result};

/// Which algorithm collectives use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgoChoice {
    /// Chosen per call by the cost model.
    Auto,
    /// Chunked pipelined ring.
    Ring,
    /// Binomial tree (reduce up, broadcast down).
    Tree,
    /// Two-level: inside nodes, then across nodes.
    Hier,
    /// Recursive doubling for all-reduces up to 64 KiB (larger ones and other
    /// collectives run the ring; compressed all-reduces run the tree, which forms each
    /// sum once).
    Doubling,
    /// Recursive halving then doubling for all-reduces (other collectives run the ring).
    Halving,
}

impl AlgoChoice {
    /// Every choice, in the order error messages list them.
    pub const ALL: [AlgoChoice; 6] = [
        AlgoChoice::Auto,
        AlgoChoice::Ring,
        AlgoChoice::Tree,
        AlgoChoice::Hier,
        AlgoChoice::Doubling,
        AlgoChoice::Halving,
    ];

    /// The value `HETCCL_ALGO` takes for it.
    pub fn name(self) -> &'static str {
        match self {
            AlgoChoice::Auto => "auto",
            AlgoChoice::Ring => "ring",
            AlgoChoice::Tree => "tree",
            AlgoChoice::Hier => "hier",
            AlgoChoice::Doubling => "doubling",
            AlgoChoice::Halving => "halving",
        }
    }
}

/// Where fp16/bf16 compression applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressMode {
    /// Never compress.
    Off,
    /// Only on inter-node links.
    Inter,
    /// On every link.
    All,
}

impl CompressMode {
    /// Every mode.
    pub const ALL: [CompressMode; 3] = [CompressMode::Off, CompressMode::Inter, CompressMode::All];

    /// `off`, `inter` or `all`, as `HETCCL_COMPRESS` spells it.
    pub fn name(self) -> &'static str {
        match self {
            CompressMode::Off => "off",
            CompressMode::Inter => "inter",
            CompressMode::All => "all",
        }
    }
}

/// How a shared-memory link writes into its ring's slots (`HETCCL_SHM_STORES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmStores {
    /// Measure the latency between the two cores as the link runs and stream where
    /// they sit in different cache domains (the default).
    Auto,
    /// Ordinary stores, which leave the bytes in the cache.
    Plain,
    /// Streaming (non-temporal) stores, which write whole lines to memory.
    Streaming,
}

impl ShmStores {
    /// Every choice.
    pub const ALL: [ShmStores; 3] = [ShmStores::Auto, ShmStores::Plain, ShmStores::Streaming];

    /// `auto`, `plain` or `streaming`, as `HETCCL_SHM_STORES` spells it.
    pub fn name(self) -> &'static str {
        match self {
            ShmStores::Auto => "auto",
            ShmStores::Plain => "plain",
            ShmStores::Streaming => "streaming",
        }
    }
}

/// How the ranks of the CUDA IPC path order their work on the device
/// (`HETCCL_DEVICE_FENCE`).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFence {
    /// `device` (the default): between the phases of a call each rank's stream writes a
    /// counter into its peers' scratch and waits for theirs, so the host queues the whole
    /// call and waits once, at its end.
    Device,
    /// `host`: the host drains its stream and meets the peers at a barrier between
    /// phases.
    Host,
}

#[cfg(feature = "cuda")]
impl DeviceFence {
    /// Every kind.
    pub const ALL: [DeviceFence; 2] = [DeviceFence::Device, DeviceFence::Host];

    /// `device` or `host`, as `HETCCL_DEVICE_FENCE` spells it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceFence::Device => "device",
            DeviceFence::Host => "host",
        }
    }
}

/// How ranks find each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMethod {
    /// `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` (or MPI/Slurm variables) and a TCP store on rank 0.
    Env,
    /// A rendezvous directory on a shared filesystem (`file:///path`).
    File(PathBuf),
    /// Through MPI (the `mpi` cargo feature).
    Mpi,
}

/// Rank identity found in the environment (torchrun, launcher, OpenMPI, PMI, Slurm).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Global rank.
    pub rank: Option<usize>,
    /// Number of ranks.
    pub world_size: Option<usize>,
    /// Rank within the node.
    pub local_rank: Option<usize>,
    /// Ranks within the node.
    pub local_world_size: Option<usize>,
    /// Address of rank 0's store.
    pub master_addr: Option<String>,
    /// Port of rank 0's store.
    pub master_port: Option<u16>,
    /// Which launcher set these (`torchrun`, `openmpi`, `pmi`, `slurm`).
    pub source: &'static str,
    /// The launcher's name for this job, the same on every rank and different for every
    /// job running at the same time: OpenMPI's job id and launcher address
    /// (`OMPI_MCA_ess_base_jobid`, `OMPI_MCA_orte_hnp_uri`), PMIx's namespace and server
    /// (`PMIX_NAMESPACE`, `PMIX_SERVER_URI*`: OpenMPI 5), Slurm's job and step
    /// (`SLURM_JOB_ID`, `SLURM_STEP_ID`), torchrun's `TORCHELASTIC_RUN_ID`.
    pub job_identity: Option<String>,
    /// Number of hosts the job's ranks run on, where the launcher says
    /// (`SLURM_STEP_NUM_NODES`, else `SLURM_NNODES`).
    pub nodes: Option<usize>,
    /// `HETCCL_LAUNCHER_FD`: the socket `hetccl run` hands each rank to watch for its exit.
    pub launcher_fd: Option<i32>,
    /// `TORCHELASTIC_USE_AGENT_STORE`: torchrun's agent already serves its own store (a
    /// PyTorch `TCPStore`, another protocol) on `MASTER_ADDR:MASTER_PORT`.
    pub agent_store: bool,
}

/// Log verbosity (`HETCCL_DEBUG`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings (default).
    Warn,
    /// Configuration, topology, links and algorithm choices, once each.
    Info,
    /// Per-collective detail.
    Debug,
    /// Everything.
    Trace,
}

/// All settings of a hetccl process.
#[derive(Clone, Debug)]
pub struct Config {
    /// `HETCCL_TIMEOUT` (seconds): how long a collective waits for a silent peer.
    pub timeout: Duration,
    /// `HETCCL_ALGO`: `auto|ring|tree|hier|doubling|halving`.
    pub algo: AlgoChoice,
    /// `HETCCL_SHM_DISABLE`: force TCP between ranks on one host.
    pub shm_disable: bool,
    /// `HETCCL_SHM_STORES`: `auto|plain|streaming`, how shared-memory links write
    /// into their rings (`auto`: measured as they run, see `transport::shm`).
    pub shm_stores: ShmStores,
    /// `HETCCL_SOCKET_IFNAME`: the network interface to listen and connect on.
    pub socket_ifname: Option<String>,
    /// `HETCCL_NSOCKS_PERPEER`: TCP sockets per peer, chunks striped across them. One by
    /// default: on loopback a second socket only adds syscalls, and large all-reduces ran
    /// slower with two (`docs/perf-log/2026-11-27-change-log.md`); NICs that need several
    /// streams to fill can ask for more.
    pub nsocks_per_peer: usize,
    /// `HETCCL_CHUNK_BYTES`: pipeline chunk size (halved where a node runs more ranks
    /// than CPUs over TCP, and at most a quarter of each rank's block, down to 128 KiB;
    /// see `LinkModel::chunk_bytes`).
    pub chunk_bytes: usize,
    /// `HETCCL_PIPELINE_DEPTH`: chunks in flight per collective.
    pub pipeline_depth: usize,
    /// `HETCCL_DEBUG`: log level.
    pub debug: LogLevel,
    /// `HETCCL_INIT`: `env://` (default), `file:///path`, `mpi`.
    pub init: InitMethod,
    /// `HETCCL_JOB_ID`: names the job in handshakes and shm segments.
    pub job_id: Option<String>,
    /// `HETCCL_JOB_KEY`: the shared secret for connection handshakes.
    pub job_key: Option<String>,
    /// `HETCCL_NODE_ID`: overrides hostname+boot id when grouping ranks into nodes.
    pub node_id: Option<String>,
    /// `HETCCL_TOPO_FILE`: load the topology from this JSON file instead of discovering it.
    pub topo_file: Option<PathBuf>,
    /// `HETCCL_TOPO_DUMP_FILE`: write the discovered topology here.
    pub topo_dump_file: Option<PathBuf>,
    /// `HETCCL_TRACE`: write a Chrome trace / Perfetto timeline of every collective to
    /// this file, `%r` replaced by the rank (`crate::observe::trace`).
    pub trace: Option<String>,
    /// `HETCCL_TOPO_PROBE`: measure latency and bandwidth of the links the algorithms
    /// use at start (on by default; a fraction of a second).
    pub topo_probe: bool,
    /// `HETCCL_SPREAD`: at init, move each rank of a host that has a core for each of
    /// its ranks to a core of its own, then allow it every core again
    /// (`crate::topology::place`; on by default).
    pub spread: bool,
    /// `HETCCL_COMPRESS`: `off|inter|all`.
    pub compress: CompressMode,
    /// `HETCCL_COMPRESS_FORMAT`: `fp16|bf16`, the wire format `HETCCL_COMPRESS` uses.
    pub compress_format: WireFormat,
    /// `HETCCL_CONNECT_TIMEOUT` (seconds): how long bootstrap waits for rank 0 / peers.
    pub connect_timeout: Duration,
    /// `HETCCL_STREAM_MIN_BYTES`: a collective whose output is at least this large
    /// writes what it only copies into place (the other ranks' results, on shared
    /// buffers or received over links, and ring results it forwarded from a link's
    /// buffer), and out-of-place sums that nothing in the call reads again (a
    /// reduce-scatter's block, a reduce's result, a rank's segment on shared buffers),
    /// with streaming (cache-bypassing) stores; over links, an output of its own (out
    /// of place) from a quarter of this size ([`Config::stream_min_for`]).
    pub stream_min_bytes: usize,
    /// `HETCCL_DEVICE_SCRATCH_BYTES`: the device buffer each rank shares with the others
    /// on the CUDA IPC path; longer messages pass through it in windows of this size.
    /// The `device_*` settings exist in builds with the `cuda` feature only; other
    /// builds do not read their variables.
    #[cfg(feature = "cuda")]
    pub device_scratch_bytes: usize,
    /// `HETCCL_DEVICE_STAGE_BYTES`: each of the two pinned host buffers that a device
    /// collective on the staged path passes its data through, piece by piece; every
    /// piece is one host collective, so pieces much smaller than a few MiB pay the host
    /// collective's fixed costs too often.
    #[cfg(feature = "cuda")]
    pub device_stage_bytes: usize,
    /// `HETCCL_DEVICE_FENCE`: `device|host`, how the CUDA IPC path orders the ranks'
    /// device work between the phases of a call.
    #[cfg(feature = "cuda")]
    pub device_fence: DeviceFence,
    /// `HETCCL_DEVICE_ONE_SHOT_BYTES`: largest window of a device all-reduce on the
    /// CUDA IPC path that every rank reduces whole (one fence) rather than a segment each
    /// and then gathering (two). Unset: 256 KiB, and every size when the ranks share
    /// one GPU; 0: always two.
    #[cfg(feature = "cuda")]
    pub device_one_shot_bytes: Option<usize>,
    /// `HETCCL_TCP_CONGESTION`: congestion control of hetccl's TCP sockets.
    pub tcp_congestion: TcpCongestion,
    /// `HETCCL_FLIGHT_DIR`: where a rank writes its flight-recorder dump (`rank-K.json`)
    /// when a collective fails or SIGUSR1 asks; `hetccl run` sets it to a private
    /// directory per job and prints one report from the dumps (`src/flight/`).
    pub flight_dir: Option<PathBuf>,
    /// `HETCCL_DOCTOR_CLOCK_OFFSET_MS`: milliseconds `hetccl doctor` adds to this rank's
    /// clock in its replies to the clock-skew pings: a skewed clock, to see the check
    /// fail without touching the system clock. Unset: 0.
    pub doctor_clock_offset_ms: f64,
    /// Rank identity from the launcher.
    pub launch: LaunchEnv,
    /// `XDG_RUNTIME_DIR`: the user's private runtime directory, where one-host jobs keep
    /// their key file when `/dev/shm` is missing.
    pub runtime_dir: Option<PathBuf>,
}

/// Which TCP congestion control hetccl's sockets use (`HETCCL_TCP_CONGESTION`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpCongestion {
    /// `cubic` where the kernel allows it, else the system default (the default). BBR,
    /// the default on many hosts, paces segments by a bandwidth estimate that the
    /// start-up probe's short round trips keep low, so it spaces out the segments of
    /// every later message; cubic keeps no such estimate (the runs on loopback:
    /// `docs/perf-log/2026-11-27-tcp-congestion-direct-receives.md`).
    Auto,
    /// `system`: leave the sockets as the kernel made them.
    System,
    /// Any other value: that algorithm, or link setup fails naming it.
    Named(String),
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(300),
            algo: AlgoChoice::Auto,
            shm_disable: false,
            shm_stores: ShmStores::Auto,
            socket_ifname: None,
            nsocks_per_peer: 1,
            chunk_bytes: 512 << 10,
            pipeline_depth: 4,
            debug: LogLevel::Warn,
            init: InitMethod::Env,
            job_id: None,
            job_key: None,
            node_id: None,
            topo_file: None,
            topo_dump_file: None,
            trace: None,
            topo_probe: true,
            spread: true,
            compress: CompressMode::Off,
            compress_format: WireFormat::F16,
            connect_timeout: Duration::from_secs(60),
            stream_min_bytes: 32 << 20,
            #[cfg(feature = "cuda")]
            device_scratch_bytes: 64 << 20,
            #[cfg(feature = "cuda")]
            device_stage_bytes: 2 << 20,
            #[cfg(feature = "cuda")]
            device_fence: DeviceFence::Device,
            #[cfg(feature = "cuda")]
            device_one_shot_bytes: None,
            tcp_congestion: TcpCongestion::Auto,
            flight_dir: None,
            doctor_clock_offset_ms: 0.0,
            launch: LaunchEnv::default(),
            runtime_dir: None,
        }
    }
}

/// Longest `HETCCL_TIMEOUT`: one week.
pub const MAX_TIMEOUT_SECS: f64 = 7.0 * 24.0 * 3600.0;
/// Longest `HETCCL_CONNECT_TIMEOUT`: one day.
pub const MAX_CONNECT_TIMEOUT_SECS: f64 = 24.0 * 3600.0;
/// Shortest timeout either variable accepts: one millisecond (shorter ones round to zero).
pub const MIN_TIMEOUT_SECS: f64 = 0.001;

struct Vars<'a>(&'a HashMap<String, String>);

impl Vars<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn bad(&self, k: &str, accepted: &str) -> Error {
        Error::Config {
            var: k.to_string(),
            value: self.0.get(k).cloned().unwrap_or_default(),
            accepted: accepted.to_string(),
        }
    }

    fn parse_usize(&self, k: &str, lo: usize, hi: usize) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                let accepted = format!("an integer from {lo} to {hi}");
                let n = parse_size(v).ok_or_else(|| self.bad(k, &accepted))?;
                if n < lo || n > hi {
                    return Err(self.bad(k, &accepted));
                }
                Ok(Some(n))
            }
        }
    }

    /// Seconds from `MIN_TIMEOUT_SECS` to `max` (`max_words` says it in words). The upper
    /// bound keeps `Instant::now() + timeout` and `Duration::from_secs_f64` in range.
    fn parse_secs(&self, k: &str, max: f64, max_words: &str) -> Result<Option<Duration>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                let accepted = format!(
                    "a number of seconds from {MIN_TIMEOUT_SECS} to {max} ({max_words}), e.g. 30 or 0.5"
                );
                let s: f64 = v.parse().map_err(|_| self.bad(k, &accepted))?;
                if !(MIN_TIMEOUT_SECS..=max).contains(&s) {
                    return Err(self.bad(k, &accepted));
                }
                Duration::try_from_secs_f64(s)
                    .map(Some)
                    .map_err(|_| self.bad(k, &accepted))
            }
        }
    }

    /// A signed number of milliseconds within a day; unset is 0.
    fn parse_offset_ms(&self, k: &str) -> Result<f64> {
        match self.get(k) {
            None => Ok(0.0),
            Some(v) => {
                let accepted =
                    "a number of milliseconds from -86400000 to 86400000, e.g. 5000 or -2.5";
                let ms: f64 = v.trim().parse().map_err(|_| self.bad(k, accepted))?;
                if !(-86_400_000.0..=86_400_000.0).contains(&ms) {
                    return Err(self.bad(k, accepted));
                }
                Ok(ms)
            }
        }
    }

    fn parse_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k).map(|v| v.to_ascii_lowercase()) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" | "on" => Ok(Some(true)),
                "0" | "false" | "no" | "off" => Ok(Some(false)),
                _ => Err(self.bad(k, "0, 1, true, false, yes, no, on, off")),
            },
        }
    }

    fn parse_enum<T: Copy>(&self, k: &str, table: &[(&str, T)]) -> Result<Option<T>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                let v = v.to_ascii_lowercase();
                table
                    .iter()
                    .find(|(name, _)| *name == v)
                    .map(|(_, t)| Some(*t))
                    .ok_or_else(|| {
                        let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                        self.bad(k, &names.join(", "))
                    })
            }
        }
    }

    fn string(&self, k: &str) -> Option<String> {
        self.get(k).map(str::to_string)
    }
}

/// Parses `4096`, `64K`, `16M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1usize << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

impl Config {
    /// The output size from which a collective over links writes with streaming stores
    /// ([`Config::stream_min_bytes`]): that size where the output is also the input (in
    /// place: its lines were just read and sit in the cache, so a streaming store must
    /// first push each out, and ordinary ones win up to outputs that no longer fit
    /// beside the input), a quarter of it where the output is a buffer of its own (out
    /// of place: none of its lines is in the cache, and an ordinary store first fetches
    /// each from memory). Two ranks on one host, 8 MiB out of place: 1.6x faster
    /// streamed, where in place loses 17 %.
    pub fn stream_min_for(&self, in_place: bool) -> usize {
        if in_place {
            self.stream_min_bytes
        } else {
            self.stream_min_bytes / 4
        }
    }

    /// Makes this the configuration of rank `rank` of `size` in job `job_id`, whose
    /// store is at `host:port` (`env://`), whatever launcher variables the environment
    /// had; `source` names what set them in logs. A launcher's local rank and size
    /// belong to its own numbering, not to this job's, so they are dropped.
    pub fn join_store(
        &mut self,
        host: String,
        port: u16,
        job_id: String,
        rank: usize,
        size: usize,
        source: &'static str,
    ) {
        self.init = InitMethod::Env;
        self.launch.rank = Some(rank);
        self.launch.world_size = Some(size);
        self.launch.local_rank = None;
        self.launch.local_world_size = None;
        self.launch.master_addr = Some(host);
        self.launch.master_port = Some(port);
        self.launch.source = source;
        self.job_id = Some(job_id);
    }

    /// This configuration for logs: the handshake key, a secret, reads `<set>`.
    pub fn redacted(&self) -> Config {
        Config {
            job_key: self.job_key.as_ref().map(|_| "<set>".into()),
            ..self.clone()
        }
    }

    /// Reads and validates every `HETCCL_*` and launcher variable from the process environment.
    pub fn from_env() -> Result<Self> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_vars(&vars)
    }

    /// Like [`Config::from_env`], with `overrides` (name, value) laid over the process
    /// environment: the settings of one communicator (the C API's
    /// `hetcclCommInitRankSettings`).
    pub fn from_env_with(overrides: &[(String, String)]) -> Result<Self> {
        let mut vars: HashMap<String, String> = std::env::vars().collect();
        vars.extend(overrides.iter().cloned());
        Self::from_vars(&vars)
    }

    /// Like [`Config::from_env`], from an explicit map (used by tests and the C API).
    pub fn from_vars(map: &HashMap<String, String>) -> Result<Self> {
        let v = Vars(map);
        let d = Config::default();
        let init = match v.get("HETCCL_INIT") {
            None | Some("env://") | Some("env") => InitMethod::Env,
            Some("mpi") | Some("mpi://") => InitMethod::Mpi,
            Some(s) if s.starts_with("file://") && s.len() > "file://".len() => {
                InitMethod::File(PathBuf::from(&s["file://".len()..]))
            }
            Some(_) => return Err(v.bad("HETCCL_INIT", "env://, mpi, file:///path/to/dir")),
        };
        Ok(Config {
            timeout: v
                .parse_secs("HETCCL_TIMEOUT", MAX_TIMEOUT_SECS, "one week")?
                .unwrap_or(d.timeout),
            algo: v
                .parse_enum("HETCCL_ALGO", &AlgoChoice::ALL.map(|a| (a.name(), a)))?
                .unwrap_or(d.algo),
            shm_disable: v.parse_bool("HETCCL_SHM_DISABLE")?.unwrap_or(false),
            shm_stores: v
                .parse_enum("HETCCL_SHM_STORES", &ShmStores::ALL.map(|m| (m.name(), m)))?
                .unwrap_or(d.shm_stores),
            socket_ifname: v.string("HETCCL_SOCKET_IFNAME"),
            nsocks_per_peer: v
                .parse_usize("HETCCL_NSOCKS_PERPEER", 1, 16)?
                .unwrap_or(d.nsocks_per_peer),
            chunk_bytes: v
                .parse_usize("HETCCL_CHUNK_BYTES", 4096, 64 << 20)?
                .unwrap_or(d.chunk_bytes),
            pipeline_depth: v
                .parse_usize("HETCCL_PIPELINE_DEPTH", 1, 64)?
                .unwrap_or(d.pipeline_depth),
            debug: v
                .parse_enum(
                    "HETCCL_DEBUG",
                    &[
                        ("error", LogLevel::Error),
                        ("warn", LogLevel::Warn),
                        ("info", LogLevel::Info),
                        ("debug", LogLevel::Debug),
                        ("trace", LogLevel::Trace),
                    ],
                )?
                .unwrap_or(d.debug),
            init,
            job_id: v.string("HETCCL_JOB_ID"),
            job_key: v.string("HETCCL_JOB_KEY"),
            node_id: v.string("HETCCL_NODE_ID"),
            topo_file: v.string("HETCCL_TOPO_FILE").map(PathBuf::from),
            topo_dump_file: v.string("HETCCL_TOPO_DUMP_FILE").map(PathBuf::from),
            trace: v.string("HETCCL_TRACE"),
            topo_probe: v.parse_bool("HETCCL_TOPO_PROBE")?.unwrap_or(d.topo_probe),
            spread: v.parse_bool("HETCCL_SPREAD")?.unwrap_or(d.spread),
            compress: v
                .parse_enum("HETCCL_COMPRESS", &CompressMode::ALL.map(|m| (m.name(), m)))?
                .unwrap_or(d.compress),
            compress_format: v
                .parse_enum(
                    "HETCCL_COMPRESS_FORMAT",
                    &WireFormat::ALL.map(|f| (f.name(), f)),
                )?
                .unwrap_or(d.compress_format),
            connect_timeout: v
                .parse_secs(
                    "HETCCL_CONNECT_TIMEOUT",
                    MAX_CONNECT_TIMEOUT_SECS,
                    "one day",
                )?
                .unwrap_or(d.connect_timeout),
            stream_min_bytes: v
                .parse_usize("HETCCL_STREAM_MIN_BYTES", 0, usize::MAX)?
                .unwrap_or(d.stream_min_bytes),
            #[cfg(feature = "cuda")]
            device_scratch_bytes: v
                .parse_usize("HETCCL_DEVICE_SCRATCH_BYTES", 1 << 20, 1 << 40)?
                .unwrap_or(d.device_scratch_bytes),
            #[cfg(feature = "cuda")]
            device_stage_bytes: v
                .parse_usize("HETCCL_DEVICE_STAGE_BYTES", 4 << 10, 1 << 36)?
                .unwrap_or(d.device_stage_bytes),
            #[cfg(feature = "cuda")]
            device_fence: v
                .parse_enum(
                    "HETCCL_DEVICE_FENCE",
                    &DeviceFence::ALL.map(|f| (f.name(), f)),
                )?
                .unwrap_or(d.device_fence),
            #[cfg(feature = "cuda")]
            device_one_shot_bytes: v.parse_usize("HETCCL_DEVICE_ONE_SHOT_BYTES", 0, 1 << 40)?,
            tcp_congestion: match v.get("HETCCL_TCP_CONGESTION") {
                None | Some("auto") => TcpCongestion::Auto,
                Some("system") => TcpCongestion::System,
                // The kernel's names: at most 15 bytes of letters, digits, '_' and '-'.
                Some(n)
                    if n.len() < 16
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    TcpCongestion::Named(n.to_string())
                }
                Some(_) => {
                    return Err(v.bad(
                        "HETCCL_TCP_CONGESTION",
                        "auto, system, or an algorithm name such as cubic, reno, bbr",
                    ))
                }
            },
            flight_dir: v.string("HETCCL_FLIGHT_DIR").map(PathBuf::from),
            doctor_clock_offset_ms: v.parse_offset_ms("HETCCL_DOCTOR_CLOCK_OFFSET_MS")?,
            launch: launch_env(&v)?,
            runtime_dir: v.string("XDG_RUNTIME_DIR").map(PathBuf::from),
        })
    }
}

/// Finds rank identity from the first launcher whose variables are present:
/// torchrun / hetccl launcher, OpenMPI, PMI (MPICH, Intel MPI), Slurm.
fn launch_env(v: &Vars) -> Result<LaunchEnv> {
    let pu = |k: &str| v.parse_usize(k, 0, 1 << 24);
    let mut env = LaunchEnv {
        master_addr: v.string("MASTER_ADDR"),
        launcher_fd: v
            .parse_usize("HETCCL_LAUNCHER_FD", 0, i32::MAX as usize)?
            .map(|fd| fd as i32),
        agent_store: v
            .parse_bool("TORCHELASTIC_USE_AGENT_STORE")?
            .unwrap_or(false),
        ..LaunchEnv::default()
    };
    env.master_port = match v.get("MASTER_PORT") {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| v.bad("MASTER_PORT", "a TCP port from 1 to 65535"))?,
        ),
    };
    let sources: [(&'static str, [&str; 4]); 4] = [
        (
            "torchrun",
            ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
        ),
        (
            "openmpi",
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ],
        ),
        (
            "pmi",
            ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
        ),
        (
            "slurm",
            [
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS_PER_NODE",
            ],
        ),
    ];
    for (source, [r, w, lr, lw]) in sources {
        if v.get(r).is_some() && v.get(w).is_some() {
            env.rank = pu(r)?;
            env.world_size = pu(w)?;
            env.local_rank = pu(lr)?;
            // SLURM_NTASKS_PER_NODE may read "2(x3)"; only a plain number is used.
            env.local_world_size = v.get(lw).and_then(|s| s.parse().ok());
            env.source = source;
            break;
        }
    }
    env.job_identity = job_identity(v, env.source);
    if env.source == "slurm" {
        env.nodes = match v.get("SLURM_STEP_NUM_NODES") {
            Some(_) => pu("SLURM_STEP_NUM_NODES")?,
            None => pu("SLURM_NNODES")?,
        };
    }
    if let (Some(r), Some(w)) = (env.rank, env.world_size) {
        if w == 0 || r >= w {
            return Err(Error::Config {
                var: "RANK".into(),
                value: format!("{r} (world size {w})"),
                accepted: "0 <= RANK < WORLD_SIZE".into(),
            });
        }
    }
    Ok(env)
}

/// The launcher's name for the job (see [`LaunchEnv::job_identity`]), from the variables
/// its documentation promises to every process: a value that names the launcher process
/// as well as its job counter, so two launchers on one host never share it.
fn job_identity(v: &Vars, source: &str) -> Option<String> {
    let pmix = || {
        let ns = v.get("PMIX_NAMESPACE")?;
        let server = ["PMIX_SERVER_URI41", "PMIX_SERVER_URI4", "PMIX_SERVER_URI3"]
            .iter()
            .find_map(|k| v.get(k))
            .unwrap_or("");
        Some(format!("pmix:{ns}:{server}"))
    };
    match source {
        "openmpi" => match (
            v.get("OMPI_MCA_ess_base_jobid"),
            v.get("OMPI_MCA_orte_hnp_uri"),
        ) {
            (Some(job), Some(hnp)) => Some(format!("openmpi:{job}:{hnp}")),
            _ => pmix(),
        },
        "slurm" => {
            let job = v.get("SLURM_JOB_ID").or_else(|| v.get("SLURM_JOBID"))?;
            let step = v
                .get("SLURM_STEP_ID")
                .or_else(|| v.get("SLURM_STEPID"))
                .unwrap_or("");
            Some(format!("slurm:{job}.{step}"))
        }
        "torchrun" => v
            .get("TORCHELASTIC_RUN_ID")
            .map(|id| format!("torchrun:{id}"))
            .or_else(pmix),
        _ => pmix(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(&m)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.algo, AlgoChoice::Auto);
        assert_eq!(c.timeout, Duration::from_secs(300));
        let c = cfg(&[
            ("HETCCL_ALGO", "Ring"),
            ("HETCCL_TIMEOUT", "2.5"),
            ("HETCCL_CHUNK_BYTES", "256K"),
            ("HETCCL_STREAM_MIN_BYTES", "1G"),
            ("HETCCL_INIT", "file:///tmp/rdv"),
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(c.algo, AlgoChoice::Ring);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.chunk_bytes, 256 << 10);
        assert_eq!(c.stream_min_bytes, 1 << 30);
        assert_eq!(
            (c.stream_min_for(true), c.stream_min_for(false)),
            (1 << 30, 256 << 20),
            "in place from the set size, out of place from a quarter of it"
        );
        assert_eq!(c.tcp_congestion, TcpCongestion::Auto);
        let named = |v: &str| cfg(&[("HETCCL_TCP_CONGESTION", v)]).map(|c| c.tcp_congestion);
        assert_eq!(named("system").unwrap(), TcpCongestion::System);
        assert_eq!(named("reno").unwrap(), TcpCongestion::Named("reno".into()));
        let e = named("cubic; rm").unwrap_err().to_string();
        assert!(
            e.contains("HETCCL_TCP_CONGESTION") && e.contains("cubic, reno"),
            "{e}"
        );
        let d = cfg(&[]).unwrap();
        assert_eq!(d.stream_min_bytes, 32 << 20);
        assert_eq!(
            (d.stream_min_for(true), d.stream_min_for(false)),
            (32 << 20, 8 << 20)
        );
        assert_eq!(c.init, InitMethod::File("/tmp/rdv".into()));
        assert_eq!((c.launch.rank, c.launch.world_size), (Some(3), Some(4)));
        assert_eq!(c.launch.source, "torchrun");
    }

    /// The `device_*` settings, which builds with the `cuda` feature alone have.
    #[cfg(feature = "cuda")]
    #[test]
    fn device_settings_defaults_overrides_and_refusals() {
        let c = cfg(&[
            ("HETCCL_DEVICE_SCRATCH_BYTES", "8M"),
            ("HETCCL_DEVICE_STAGE_BYTES", "40000"),
        ])
        .unwrap();
        assert_eq!(c.device_scratch_bytes, 8 << 20);
        assert_eq!(cfg(&[]).unwrap().device_scratch_bytes, 64 << 20);
        assert_eq!(c.device_stage_bytes, 40000);
        assert_eq!(cfg(&[]).unwrap().device_stage_bytes, 2 << 20);
        assert_eq!(c.device_fence, DeviceFence::Device);
        let fence = cfg(&[("HETCCL_DEVICE_FENCE", "Host")]).unwrap();
        assert_eq!(fence.device_fence, DeviceFence::Host);
        assert_eq!(c.device_one_shot_bytes, None);
        let one = cfg(&[("HETCCL_DEVICE_ONE_SHOT_BYTES", "1M")]).unwrap();
        assert_eq!(one.device_one_shot_bytes, Some(1 << 20));
        let e = cfg(&[("HETCCL_DEVICE_SCRATCH_BYTES", "4K")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HETCCL_DEVICE_SCRATCH_BYTES") && e.contains("from 1048576"),
            "{e}"
        );
        let e = cfg(&[("HETCCL_DEVICE_STAGE_BYTES", "1K")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HETCCL_DEVICE_STAGE_BYTES") && e.contains("from 4096"),
            "{e}"
        );
        let e = cfg(&[("HETCCL_DEVICE_FENCE", "events")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid value \"events\" for HETCCL_DEVICE_FENCE: accepted values are device, host"
        );
    }

    #[test]
    fn logs_show_whether_a_job_key_is_set_but_not_the_key() {
        let c = cfg(&[("HETCCL_JOB_KEY", "0123456789abcdef-secret")]).unwrap();
        let shown = format!("{:?}", c.redacted());
        assert!(!shown.contains("0123456789abcdef-secret"), "{shown}");
        assert!(shown.contains("job_key: Some(\"<set>\")"), "{shown}");
        assert_eq!(c.job_key.as_deref(), Some("0123456789abcdef-secret"));
        assert!(format!("{:?}", cfg(&[]).unwrap().redacted()).contains("job_key: None"));
    }

    #[test]
    fn bad_values_name_the_variable_and_accepted_values() {
        let e = cfg(&[("HETCCL_ALGO", "fast")]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value \"fast\" for HETCCL_ALGO: accepted values are auto, ring, tree, hier, \
             doubling, halving"
        );
        let e = cfg(&[("HETCCL_DOCTOR_CLOCK_OFFSET_MS", "1e9")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid value \"1e9\" for HETCCL_DOCTOR_CLOCK_OFFSET_MS: accepted values are a \
             number of milliseconds from -86400000 to 86400000, e.g. 5000 or -2.5"
        );
        let c = cfg(&[("HETCCL_DOCTOR_CLOCK_OFFSET_MS", "-2.5")]).unwrap();
        assert_eq!(c.doctor_clock_offset_ms, -2.5);
        assert_eq!(cfg(&[]).unwrap().doctor_clock_offset_ms, 0.0);
        let e = cfg(&[("HETCCL_TIMEOUT", "-1")]).unwrap_err().to_string();
        assert!(e.contains("HETCCL_TIMEOUT"), "{e}");
        let e = cfg(&[("HETCCL_NSOCKS_PERPEER", "99")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("from 1 to 16"), "{e}");
        let e = cfg(&[("RANK", "4"), ("WORLD_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK < WORLD_SIZE"), "{e}");
        let e = cfg(&[("MASTER_PORT", "http")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
    }

    #[test]
    fn shared_memory_stores_are_measured_unless_fixed() {
        assert_eq!(cfg(&[]).unwrap().shm_stores, ShmStores::Auto);
        for m in ShmStores::ALL {
            let c = cfg(&[("HETCCL_SHM_STORES", m.name())]).unwrap();
            assert_eq!(c.shm_stores, m);
        }
        let e = cfg(&[("HETCCL_SHM_STORES", "nt")]).unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value \"nt\" for HETCCL_SHM_STORES: accepted values are auto, plain, \
             streaming"
        );
    }

    #[test]
    fn topology_probe_switch() {
        assert!(cfg(&[]).unwrap().topo_probe);
        assert!(!cfg(&[("HETCCL_TOPO_PROBE", "0")]).unwrap().topo_probe);
        assert!(cfg(&[("HETCCL_TOPO_PROBE", "on")]).unwrap().topo_probe);
        assert!(cfg(&[]).unwrap().spread);
        assert!(!cfg(&[("HETCCL_SPREAD", "0")]).unwrap().spread);
        let e = cfg(&[("HETCCL_SPREAD", "sometimes")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HETCCL_SPREAD") && e.contains("sometimes"),
            "{e}"
        );
        let e = cfg(&[("HETCCL_TOPO_PROBE", "maybe")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid value \"maybe\" for HETCCL_TOPO_PROBE: accepted values are 0, 1, true, false, yes, no, on, off"
        );
    }

    #[test]
    fn openmpi_variables_are_understood() {
        let c = cfg(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(c.launch.source, "openmpi");
        assert_eq!(c.launch.local_world_size, Some(2));
    }

    #[test]
    fn timeouts_out_of_range_are_refused_naming_the_variable_and_range() {
        let week = "a number of seconds from 0.001 to 604800 (one week), e.g. 30 or 0.5";
        let day = "a number of seconds from 0.001 to 86400 (one day), e.g. 30 or 0.5";
        for (var, accepted) in [("HETCCL_TIMEOUT", week), ("HETCCL_CONNECT_TIMEOUT", day)] {
            for bad in [
                "1e30", "1e19", "inf", "NaN", "0", "-1", "0.0001", "1e400", "ten",
            ] {
                let e = cfg(&[(var, bad)]).unwrap_err().to_string();
                assert_eq!(
                    e,
                    format!("invalid value {bad:?} for {var}: accepted values are {accepted}")
                );
            }
        }
        assert!(cfg(&[("HETCCL_TIMEOUT", "604801")]).is_err());
        assert!(cfg(&[("HETCCL_CONNECT_TIMEOUT", "86401")]).is_err());
        let c = cfg(&[
            ("HETCCL_TIMEOUT", "604800"),
            ("HETCCL_CONNECT_TIMEOUT", "86400"),
        ])
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(604800));
        assert_eq!(c.connect_timeout, Duration::from_secs(86400));
        // The longest values still leave room on the clock.
        assert!(std::time::Instant::now().checked_add(c.timeout).is_some());
        let c = cfg(&[("HETCCL_CONNECT_TIMEOUT", "0.001")]).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(1));
    }

    #[test]
    fn launchers_name_their_job() {
        let c = cfg(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_MCA_ess_base_jobid", "140247041"),
            ("OMPI_MCA_orte_hnp_uri", "140247040.0;tcp://127.0.0.1:41599"),
            ("PMIX_NAMESPACE", "140247041"),
        ])
        .unwrap();
        assert_eq!(
            c.launch.job_identity.as_deref(),
            Some("openmpi:140247041:140247040.0;tcp://127.0.0.1:41599")
        );
        assert_eq!(c.launch.nodes, None);
        // OpenMPI 5 (PRRTE) has no ORTE variables: PMIx names the job.
        let c = cfg(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("PMIX_NAMESPACE", "prterun-vm-2576@1"),
            (
                "PMIX_SERVER_URI41",
                "prterun-vm-2576@0.0;tcp4://127.0.0.1:5000",
            ),
        ])
        .unwrap();
        assert_eq!(
            c.launch.job_identity.as_deref(),
            Some("pmix:prterun-vm-2576@1:prterun-vm-2576@0.0;tcp4://127.0.0.1:5000")
        );
        let c = cfg(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOB_ID", "812"),
            ("SLURM_STEP_ID", "2"),
            ("SLURM_NNODES", "2"),
            ("SLURM_STEP_NUM_NODES", "1"),
        ])
        .unwrap();
        assert_eq!(c.launch.source, "slurm");
        assert_eq!(c.launch.job_identity.as_deref(), Some("slurm:812.2"));
        assert_eq!(c.launch.nodes, Some(1));
        let c = cfg(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_JOBID", "9"),
            ("SLURM_NNODES", "2"),
        ])
        .unwrap();
        assert_eq!(
            (c.launch.job_identity.as_deref(), c.launch.nodes),
            (Some("slurm:9."), Some(2))
        );
        let e = cfg(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_NNODES", "two"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("for SLURM_NNODES"), "{e}");
        let c = cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("TORCHELASTIC_RUN_ID", "abc"),
        ])
        .unwrap();
        assert_eq!(c.launch.job_identity.as_deref(), Some("torchrun:abc"));
        assert_eq!(cfg(&[]).unwrap().launch.job_identity, None);
    }

    /// Every variable `Config::from_vars` reads.
    const VARIABLES: &[&str] = &[
        "HETCCL_TIMEOUT",
        "HETCCL_ALGO",
        "HETCCL_SHM_DISABLE",
        "HETCCL_SHM_STORES",
        "HETCCL_SOCKET_IFNAME",
        "HETCCL_NSOCKS_PERPEER",
        "HETCCL_CHUNK_BYTES",
        "HETCCL_PIPELINE_DEPTH",
        "HETCCL_DEBUG",
        "HETCCL_INIT",
        "HETCCL_JOB_ID",
        "HETCCL_JOB_KEY",
        "HETCCL_NODE_ID",
        "HETCCL_TOPO_FILE",
        "HETCCL_TOPO_DUMP_FILE",
        "HETCCL_TRACE",
        "HETCCL_TOPO_PROBE",
        "HETCCL_SPREAD",
        "HETCCL_COMPRESS",
        "HETCCL_COMPRESS_FORMAT",
        "HETCCL_CONNECT_TIMEOUT",
        "HETCCL_STREAM_MIN_BYTES",
        "HETCCL_DEVICE_SCRATCH_BYTES",
        "HETCCL_DEVICE_STAGE_BYTES",
        "HETCCL_DEVICE_FENCE",
        "HETCCL_DEVICE_ONE_SHOT_BYTES",
        "HETCCL_TCP_CONGESTION",
        "HETCCL_FLIGHT_DIR",
        "HETCCL_DOCTOR_CLOCK_OFFSET_MS",
        "HETCCL_LAUNCHER_FD",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "PMI_RANK",
        "PMI_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_NNODES",
        "SLURM_STEP_NUM_NODES",
        "XDG_RUNTIME_DIR",
    ];

    /// Values near what parsers look for: numbers of every size, units, signs, words.
    fn value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<String>(),
            "[-+]?[0-9]{0,25}(\\.[0-9]{0,5})?([eE][-+]?[0-9]{1,4})?[kKmMgG]?",
            proptest::sample::select(vec![
                "inf",
                "-inf",
                "NaN",
                "0",
                "1",
                "1e30",
                "1e19",
                "18446744073709551616",
                "file://",
                "file:///x",
                "mpi",
                "env://",
                " ",
                "\u{0}",
                "ring",
                "on",
            ])
            .prop_map(str::to_string),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(400))]
        /// Any value of any variable is parsed or refused with an error naming a variable
        /// that was set; never a panic.
        #[test]
        fn any_values_are_parsed_or_refused_by_name(
            picks in proptest::collection::vec(
                (proptest::sample::select(VARIABLES), value()), 1..6)
        ) {
            let map: HashMap<String, String> =
                picks.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            if let Err(e) = Config::from_vars(&map) {
                let Error::Config { var, .. } = &e else {
                    panic!("not a configuration error: {e}");
                };
                // RANK's range check names RANK for every launcher's pair.
                proptest::prop_assert!(
                    map.contains_key(var) || var == "RANK",
                    "error names {var}, which was not set: {e}"
                );
                let text = e.to_string();
                proptest::prop_assert!(text.contains(var.as_str()), "{}", text);
            }
        }
    }
}
