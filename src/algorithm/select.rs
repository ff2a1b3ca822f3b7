//! What runs for a call: the one place that decides, for a call on a communicator, which
//! engine runs it and how. [`select`] returns the [`Path`] as a plain value (its
//! `Display` says why); the engines (the link executor, the shared-memory engine,
//! device collectives) only execute it.
//!
//! **Example.** A 1 MiB all-reduce of f32 on 4 ranks, each on a host of its own and
//! linked by TCP, with the default settings and no probe (nominal link figures):
//!
//! ```text
//! links: recursive halving and doubling, 128 KiB chunks (the cost model's cheapest)
//! ```
//!
//! Halving sends the ring's bytes in 4 steps instead of 6; the 1 MiB message gives each
//! rank a 256 KiB block, cut into pieces of a quarter, no less than 128 KiB. The same
//! call on 4 ranks of one host over TCP (`HETCCL_SHM_DISABLE=1`) with a CPU each runs
//! the same; on 2 CPUs, the ring in 128 KiB chunks. (Tests below:
//! `a_mebibyte_all_reduce_on_four_ranks_over_tcp`.)
//!
//! The decisions, in order; the first that applies wins:
//!
//! ```text
//! 0. nothing to move (moves_nothing): no elements (but barrier, send/recv), or one rank
//!    in place
//! 1. compression: an f32 Sum/Avg all-reduce is compressed when some link of it
//!    compresses (HETCCL_COMPRESS=inter: between nodes; all: every link); otherwise exact
//! 2. every rank on this host, control pages mapped, not compressed:
//!      all-reduce of at most eager_limit(n) bytes, HETCCL_ALGO=auto -> eager slots
//!      this rank's buffers are shared ones the direct algorithms read -> direct
//! 3. a schedule over links:
//!      algorithm: HETCCL_ALGO, else the cost model's cheapest candidate (candidate())
//!      compressed recursive doubling -> the tree (both partners would round differently)
//!      what the collective has a form for (runnable()): doubling only for all-reduces
//!        up to DOUBLING_MAX_BYTES, halving and hierarchical only for all-reduce, the tree
//!        or the chain for broadcast, the ring/chain for the rest, the tree for barrier
//!      chunk: tuning::LinkModel::chunk_for (hierarchical: then hier_chunk; a 2-rank
//!        all-reduce over shared memory: shm_pair_chunk, the whole block); ring order:
//!        piece by piece on one node over shared memory, else a wave
//! 4. device buffers (DeviceComm): CUDA IPC when every rank is on this host, else staged
//!    through pinned host memory (device_path(), once, when the DeviceComm is made); an
//!    IPC all-reduce window runs in one shot or two (device_all_reduce()); a staged
//!    all-reduce over hosts of which one holds several ranks is planned hierarchically
//!    (device_across_hosts(), algorithm/device_hier.rs)
//! ```
//!
//! | limit | value | what it bounds |
//! | --- | --- | --- |
//! | [`EAGER_MAX_BYTES`] | 64 KiB | eager all-reduce with 3 ranks (the slot size) |
//! | [`EAGER_MAX_BYTES_FOUR_RANKS`] | 16 KiB | eager all-reduce with 4 or more ranks |
//! | [`EAGER_MAX_BYTES_TWO_RANKS`] | 4 KiB | eager all-reduce with 2 ranks |
//! | [`DOUBLING_MAX_BYTES`] | 64 KiB | recursive doubling (its scratch is the whole message) |
//! | [`OVERSUBSCRIBED_PAIRWISE_MAX_BYTES`] | 512 KiB | halving where ranks outnumber CPUs over TCP |
//! | [`DEVICE_ONE_SHOT_MAX_BYTES`] | 256 KiB | one-shot device all-reduce window (GPUs of their own) |
//! | `tuning::MIN_CHUNK`, `tuning::MIN_BLOCK_CHUNK` | 64, 128 KiB | pipeline chunks |
//!
//! Halving is a candidate only where every pair of ranks is as good as every other
//! (`Shape::pairwise_max_bytes`: CPU ranks; where they outnumber the CPUs over TCP, up to
//! [`OVERSUBSCRIBED_PAIRWISE_MAX_BYTES`]) and the hierarchy is not (one node, or one rank
//! per node); the hierarchy only with several nodes, one of them with several ranks.
//!
//! Every input but one is the same on every rank (the shared topology and the
//! settings), so every rank takes the same path without exchanging anything. The
//! exception is whether this rank's buffers are shared ones: ranks that disagree there
//! are caught by the shared-memory engine as a mismatch ([`super::call::ran_over_links`]).

use std::fmt;

use super::cost::Shape;
use super::ring::RingOrder;
use super::tuning::LinkModel;
use super::{Algo, Call};
use crate::config::{AlgoChoice, CompressMode};
use crate::dtype::{CollectiveOp, DataType, ReduceOp};

/// Largest all-reduce, in bytes, that runs through the eager slots with 3 or more ranks
/// on one host (and the size of a slot). With three or more, the `2(n-1)` dependent
/// steps a ring would take cost more than the eager path's reads of every peer's slot
/// up to this size (the measurements: `docs/PERFORMANCE.md`, small messages).
pub const EAGER_MAX_BYTES: usize = 64 << 10;

/// Largest eager all-reduce with 2 ranks. Each rank reads every peer's slot,
/// `(n-1)·bytes`, in one step, but first copies its input into its own slot and then
/// reads that back too; recursive doubling swaps the inputs in one step as well and,
/// out of place, reduces the incoming bytes straight into the output as they arrive.
/// Alternated on the 2-core machine (`docs/perf-log/2026-12-07-doubling-out-of-place.md`),
/// out of place: 4 KiB eager 0.59-0.62 µs against doubling 0.67-0.80; 8 KiB 0.81-0.85
/// against 0.75-0.77 (one launch 1.05); 16 KiB 1.39-1.52 against 1.08-1.11 (one 1.50).
pub const EAGER_MAX_BYTES_TWO_RANKS: usize = 4 << 10;

/// Largest all-reduce that recursive halving may run where a node's ranks outnumber its
/// CPUs and talk over TCP. Two ranks that share a CPU take turns at every socket
/// buffer's worth, which halving's partners 2 and more apart do (ring neighbours sit on
/// different CPUs when ranks are pinned round robin); up to this size a message's steps
/// cost more than those turns, and halving's `2 log2 p` steps beat the ring's `2(p-1)`.
/// 4 ranks on 2 cores, 12 alternated launches of each, median µs: 128 KiB halving 130
/// against the ring's 164, 256 KiB 200 against 275, 512 KiB 360 against 432, 1 MiB 844
/// against 830 (`docs/perf-log/2026-12-07-oversubscribed-halving.md`).
pub const OVERSUBSCRIBED_PAIRWISE_MAX_BYTES: usize = 512 << 10;

/// Largest all-reduce recursive doubling runs: it swaps whole messages, and the incoming
/// copy needs scratch the size of the message; beyond this, rounds cost less than bytes.
pub const DOUBLING_MAX_BYTES: usize = 64 << 10;

/// Largest device all-reduce window that every rank reduces whole by itself when the
/// ranks have GPUs of their own ("one shot": copy in, fence, each rank reads every
/// scratch), unless `HETCCL_DEVICE_ONE_SHOT_BYTES` says otherwise. Reducing only its
/// segment and gathering the others' ("two shots") reads `2(n-1)/n` of the message from
/// the peers instead of `n-1` but needs a second fence, which is the larger cost for
/// small messages. Ranks sharing one GPU always take one shot: there each fence waits
/// for the driver to switch between their contexts.
pub const DEVICE_ONE_SHOT_MAX_BYTES: usize = 256 << 10;

/// Largest eager all-reduce with 4 or more ranks. Every rank reads `n-1` peers' slots,
/// and where ranks share cores most of those reads cross between them; recursive
/// halving moves `2(n-1)/n` of the message, its largest exchange between ranks that
/// share a core when they are placed round robin. 4 ranks on 2 cores, alternated, µs:
/// 16 KiB eager 9.5 against halving 13.1 in the machine's fast minutes, 26 against 20
/// in its slow ones; 32 KiB 16.0 against 16.7, and 47 against 30; 64 KiB 29 against 22,
/// and 88 against 48 (`docs/perf-log/2026-12-07-four-ranks-small.md`).
pub const EAGER_MAX_BYTES_FOUR_RANKS: usize = 16 << 10;

/// Largest all-reduce that takes the eager slots with `n` ranks on one host.
pub fn eager_limit(n: usize) -> usize {
    match n {
        0..=2 => EAGER_MAX_BYTES_TWO_RANKS,
        3 => EAGER_MAX_BYTES,
        _ => EAGER_MAX_BYTES_FOUR_RANKS,
    }
}

/// Whether a call over links is an all-reduce of two ranks of one host over shared
/// memory, whose pieces [`shm_pair_chunk`] sizes.
fn shm_pair(op: CollectiveOp, facts: &Facts<'_>) -> bool {
    op == CollectiveOp::AllReduce && facts.world_size == 2 && facts.nodes == 1 && !facts.shm_disable
}

/// The pipeline chunk of a 2-rank all-reduce over shared memory: the whole block (half
/// the message) up to `configured`, never less than `tuning::MIN_BLOCK_CHUNK`'s 128 KiB.
/// Over shared memory a piece costs a flag handoff between the two cores (a cache line
/// written by one and read by the other, per direction and phase), which the machine's
/// slow minutes make dearer while the reduction it overlaps stays cheap: quarter-block
/// pieces (`tuning::LinkModel::chunk_bytes`, tuned on TCP) took a 1 MiB all-reduce to
/// 8.4-9.6 GB/s busbw where whole blocks ran 10.0-12.5, 512 KiB 7.2-9.4 against
/// 8.7-10.4, in the same minutes (`docs/perf-log/2026-12-06-shm.md`). Measured with two
/// ranks only; more ranks keep the quarter blocks. Half the bytes is rounded up to 64:
/// with an odd count the larger block is half an element longer, and must still be one
/// piece.
pub fn shm_pair_chunk(bytes: usize, configured: usize) -> usize {
    configured.min((bytes / 2).next_multiple_of(64).max(128 << 10))
}

/// What the communicator knows that the choice depends on.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// Ranks.
    pub world_size: usize,
    /// Nodes (hosts) the ranks run on.
    pub nodes: usize,
    /// This rank's host has control pages mapped (every rank on it, shared memory on).
    pub control_pages: bool,
    /// `HETCCL_SHM_DISABLE`.
    pub shm_disable: bool,
    /// `HETCCL_ALGO` (or `Communicator::set_algorithm`).
    pub algo: AlgoChoice,
    /// `HETCCL_CHUNK_BYTES`.
    pub chunk_bytes: usize,
    /// `HETCCL_PIPELINE_DEPTH`.
    pub pipeline_depth: usize,
    /// The links as the cost model sees them.
    pub model: &'a LinkModel,
}

/// What runs for one call.
#[derive(Clone, Debug, PartialEq)]
pub enum Path {
    /// A small all-reduce through the eager slots of the control pages.
    Eager {
        /// Ranks, all on this host.
        ranks: usize,
        /// [`eager_limit`] for them.
        limit: usize,
    },
    /// The direct algorithms, reading the peers' shared buffers where they lie.
    Direct,
    /// A schedule over links.
    Links(Links),
    /// A device all-reduce window that every rank reduces whole.
    DeviceOneShot {
        /// Bytes of the window.
        window: usize,
        /// Why one shot.
        why: OneShot,
    },
    /// A device all-reduce window reduced a segment per rank, then gathered.
    DeviceTwoShots {
        /// Bytes of the window.
        window: usize,
        /// The largest one-shot window it exceeds.
        limit: usize,
    },
}

/// A schedule over links, as `algorithm::plan` builds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Links {
    /// The call the schedule runs: the caller's, or for a compressed call an in-place sum
    /// (its compression passes scale, round and average around it).
    pub call: Call,
    /// The algorithm that runs (every fallback applied).
    pub algo: Algo,
    /// Pipeline chunk, bytes.
    pub chunk_bytes: usize,
    /// Chunk-sized scratch slots for partial sums in flight.
    pub slots: usize,
    /// Step order of a ring all-reduce.
    pub ring_order: RingOrder,
    /// Some link of the call carries 16-bit values.
    pub compressed: bool,
    /// Where the algorithm came from.
    pub chosen: Chosen,
    /// The algorithm asked for, when another runs, and why.
    pub fallback: Option<(Algo, Fallback)>,
}

/// Where an algorithm came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    /// The collective has one form (reduce-scatter, all-gather, reduce, barrier,
    /// send/recv).
    OnlyForm,
    /// `HETCCL_ALGO` named it.
    Setting(AlgoChoice),
    /// The cost model priced it lowest.
    CostModel,
}

/// Why the algorithm asked for does not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Compressed, recursive doubling's partners would each add a rounded copy of the
    /// other's partial sum to their exact own and end with different bits; the tree
    /// forms every sum once.
    NoCompressedForm,
    /// Recursive doubling beyond [`DOUBLING_MAX_BYTES`].
    TooLarge,
    /// The algorithm has no form for this collective.
    NoSuchForm,
}

/// Why a device all-reduce window runs in one shot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OneShot {
    /// `HETCCL_DEVICE_ONE_SHOT_BYTES` is set and the window fits it.
    Configured(usize),
    /// The ranks share one GPU.
    SharedGpu,
    /// The window is at most [`DEVICE_ONE_SHOT_MAX_BYTES`].
    Small,
}

/// Whether a call moves nothing: zero elements (as in NCCL; a barrier and a send/recv
/// still synchronise), or one rank in place (out of place, a lone rank still copies its
/// input into its output). Such calls return at once and take no sequence number.
pub fn moves_nothing(call: &Call, world_size: usize) -> bool {
    let sync = matches!(call.op, CollectiveOp::Barrier | CollectiveOp::SendRecv);
    (call.count == 0 && !sync)
        || (world_size == 1 && call.in_place && call.op != CollectiveOp::SendRecv)
}

/// Whether a link compresses under `mode`: between nodes (`inter`), or every link.
pub fn compresses(mode: CompressMode, same_node: bool) -> bool {
    match mode {
        CompressMode::Off => false,
        CompressMode::Inter => !same_node,
        CompressMode::All => true,
    }
}

/// What runs for `call` (one that moves something: see [`moves_nothing`]), compressed
/// under `mode` where it applies. `shared_buffers` says whether this rank's buffers are
/// shared ones the direct algorithms can read; it is asked only when every rank shares
/// this host and the call is neither compressed nor eager.
pub fn select(
    call: &Call,
    facts: &Facts<'_>,
    mode: CompressMode,
    shared_buffers: impl FnOnce() -> bool,
) -> Path {
    let n = facts.world_size;
    let bytes = call.bytes();
    let compressed = call.op == CollectiveOp::AllReduce
        && call.dtype == DataType::F32
        && matches!(call.redop, ReduceOp::Sum | ReduceOp::Avg)
        && n > 1
        && (compresses(mode, true) || (facts.nodes > 1 && compresses(mode, false)));
    // Compression is about what crosses links: the shared-memory paths have none.
    if !compressed && n > 1 && facts.nodes == 1 && facts.control_pages {
        if call.op == CollectiveOp::AllReduce
            && bytes <= eager_limit(n)
            && facts.algo == AlgoChoice::Auto
        {
            return Path::Eager {
                ranks: n,
                limit: eager_limit(n),
            };
        }
        if shared_buffers() {
            return Path::Direct;
        }
    }
    let forced = match facts.algo {
        AlgoChoice::Auto => None,
        AlgoChoice::Ring => Some(Algo::Ring),
        AlgoChoice::Tree => Some(Algo::Tree),
        AlgoChoice::Hier => Some(Algo::Hier),
        AlgoChoice::Doubling => Some(Algo::Doubling),
        AlgoChoice::Halving => Some(Algo::Halving),
    };
    let only_form = !matches!(call.op, CollectiveOp::AllReduce | CollectiveOp::Broadcast);
    let (asked, chosen) = match forced {
        _ if only_form => (runnable(call.op, bytes, Algo::Ring).0, Chosen::OnlyForm),
        Some(a) => (a, Chosen::Setting(facts.algo)),
        // The same on every rank: the model comes from the shared topology.
        None => (facts.model.choose(call.op, bytes), Chosen::CostModel),
    };
    let (algo, fallback) = if compressed && asked == Algo::Doubling {
        (Algo::Tree, Some((asked, Fallback::NoCompressedForm)))
    } else {
        match runnable(call.op, bytes, asked) {
            (a, Some(why)) => (a, Some((asked, why))),
            (a, None) => (a, None),
        }
    };
    // A compressed call runs as an in-place sum on the output; its passes do the rest.
    let call = if compressed {
        Call {
            in_place: true,
            redop: ReduceOp::Sum,
            ..*call
        }
    } else {
        *call
    };
    Path::Links(Links {
        call,
        algo,
        chunk_bytes: match algo {
            Algo::Hier => {
                facts
                    .model
                    .hier_chunk(facts.model.chunk_for(call.op, bytes, n, facts.chunk_bytes))
            }
            _ if shm_pair(call.op, facts) => shm_pair_chunk(bytes, facts.chunk_bytes),
            _ => facts.model.chunk_for(call.op, bytes, n, facts.chunk_bytes),
        },
        slots: 2 * facts.pipeline_depth + 1,
        // Piece by piece where the links are shared memory, so receives can forward
        // their results in place (the same on every rank: the node layout is shared, and
        // setup fails unless every rank agrees on using shared memory).
        ring_order: if facts.nodes == 1 && !facts.shm_disable {
            RingOrder::PieceByPiece
        } else {
            RingOrder::Wave
        },
        compressed,
        chosen,
        fallback,
    })
}

/// The algorithm a schedule of `op` on `bytes` runs when `asked` is asked for, and why
/// when that is another: only an all-reduce has every form (recursive doubling up to
/// [`DOUBLING_MAX_BYTES`]); a broadcast is the tree or the chain ([`Algo::Ring`]);
/// reduce-scatter, all-gather, reduce and send/recv the ring or chain; barrier the tree.
pub fn runnable(op: CollectiveOp, bytes: usize, asked: Algo) -> (Algo, Option<Fallback>) {
    let only = |a: Algo| (a, (asked != a).then_some(Fallback::NoSuchForm));
    match op {
        CollectiveOp::AllReduce if asked == Algo::Doubling && bytes > DOUBLING_MAX_BYTES => {
            (Algo::Ring, Some(Fallback::TooLarge))
        }
        CollectiveOp::AllReduce => (asked, None),
        CollectiveOp::Broadcast if asked == Algo::Tree => (Algo::Tree, None),
        CollectiveOp::Broadcast
        | CollectiveOp::ReduceScatter
        | CollectiveOp::AllGather
        | CollectiveOp::Reduce
        | CollectiveOp::SendRecv => only(Algo::Ring),
        CollectiveOp::Barrier => only(Algo::Tree),
    }
}

/// The algorithms the cost model compares for `op`, in order of preference on a tie.
pub fn candidates(op: CollectiveOp) -> &'static [Algo] {
    match op {
        CollectiveOp::AllReduce => &[
            Algo::Ring,
            Algo::Tree,
            Algo::Hier,
            Algo::Doubling,
            Algo::Halving,
        ],
        CollectiveOp::Broadcast => &[Algo::Ring, Algo::Tree],
        CollectiveOp::Barrier => &[Algo::Tree],
        _ => &[Algo::Ring],
    }
}

/// Whether the cost model may pick `algo` for `bytes` over `shape`: recursive doubling
/// up to [`DOUBLING_MAX_BYTES`]; the hierarchy with several nodes, one of them with
/// several ranks; halving where the hierarchy is not, and only where any pair of ranks is
/// as good as any other. Halving's first round sends half of every rank's buffer to the
/// other half of the ranks: with several ranks per node that is the whole node crossing
/// its uplink at once, and on a GPU node pairs that are not ring neighbours, neither of
/// which the per-link model sees.
pub fn candidate(algo: Algo, shape: &Shape, bytes: usize) -> bool {
    let hier = shape.nodes > 1 && shape.max_local > 1;
    match algo {
        Algo::Hier => hier,
        // Doubling sends the whole message every round; among 4 or more ranks of one
        // host over shared memory halving's smaller exchanges win past the eager slots
        // (32 KiB on 4 ranks, 2 cores: 47 against 30 µs; see EAGER_MAX_BYTES_FOUR_RANKS).
        Algo::Doubling => bytes <= DOUBLING_MAX_BYTES && !(shape.shared_memory && shape.ranks >= 4),
        Algo::Halving => !hier && bytes <= shape.pairwise_max_bytes,
        Algo::Ring | Algo::Tree => true,
    }
}

/// How device buffers travel between ranks ([`device_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DevicePath {
    /// [`DevicePath::Ipc`] when every rank runs on this host, else [`DevicePath::Staged`].
    Auto,
    /// Peers read each other's device memory through CUDA IPC. Every rank must run on
    /// one host.
    Ipc,
    /// Chunks pass through pinned host memory and the host communicator's collectives.
    Staged,
}

impl DevicePath {
    /// `auto`, `ipc` or `staged`.
    pub fn name(self) -> &'static str {
        match self {
            DevicePath::Auto => "auto",
            DevicePath::Ipc => "ipc",
            DevicePath::Staged => "staged",
        }
    }

    /// Parses [`DevicePath::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [DevicePath::Auto, DevicePath::Ipc, DevicePath::Staged]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The path a `DeviceComm` takes for all its calls, given the one `asked` for and
/// whether every rank runs on this host (`all_local`): never `Auto`; `None` when
/// [`DevicePath::Ipc`] was asked for across hosts, which cannot work (CUDA IPC maps
/// memory between processes of one host only).
pub fn device_path(asked: DevicePath, all_local: bool) -> Option<DevicePath> {
    match asked {
        DevicePath::Auto | DevicePath::Ipc if all_local => Some(DevicePath::Ipc),
        DevicePath::Auto | DevicePath::Staged => Some(DevicePath::Staged),
        DevicePath::Ipc => None,
    }
}

/// How a staged device all-reduce crosses hosts ([`device_across_hosts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAcrossHosts {
    /// [`super::device_hier::DeviceHierPlan`]: reduce-scatter inside each host over CUDA
    /// IPC, each rank's shard alone through pinned memory and the host links, all-gather
    /// over IPC.
    Hierarchical {
        /// The smallest host's rank count: its ranks move `1/fewest` of the buffer over
        /// PCIe each way, the most of any rank.
        fewest: usize,
    },
    /// Every rank stages its whole buffer and the host communicator reduces it.
    Flat(FlatWhy),
}

/// Why a staged device all-reduce stays flat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlatWhy {
    /// One host: CUDA IPC does it (the flat staged path only when asked).
    OneHost,
    /// One rank on every host: no host-mate to share the PCIe bytes with.
    OneRankPerHost,
    /// The dtype has no device reduce kernel (f64, integers): the host reduces every
    /// byte of it, so the whole buffer crosses PCIe whatever the plan.
    Op,
}

/// Hierarchical or flat for a staged device all-reduce over hosts of `host_sizes`
/// ranks; `reducible` when the call's dtype has device reduce kernels. The
/// hierarchy pays as soon as some host holds two ranks: they split its PCIe bytes.
pub fn device_across_hosts(host_sizes: &[usize], reducible: bool) -> DeviceAcrossHosts {
    if host_sizes.len() <= 1 {
        return DeviceAcrossHosts::Flat(FlatWhy::OneHost);
    }
    if !reducible {
        return DeviceAcrossHosts::Flat(FlatWhy::Op);
    }
    if host_sizes.iter().all(|&g| g <= 1) {
        return DeviceAcrossHosts::Flat(FlatWhy::OneRankPerHost);
    }
    DeviceAcrossHosts::Hierarchical {
        fewest: host_sizes.iter().copied().min().unwrap_or(1),
    }
}

/// One shot or two for a device all-reduce window of `window` bytes on the CUDA IPC
/// path; `shared_gpu` when the ranks share one GPU, `configured` from
/// `HETCCL_DEVICE_ONE_SHOT_BYTES`.
pub fn device_all_reduce(window: usize, shared_gpu: bool, configured: Option<usize>) -> Path {
    match configured {
        Some(max) if window <= max => Path::DeviceOneShot {
            window,
            why: OneShot::Configured(max),
        },
        Some(max) => Path::DeviceTwoShots { window, limit: max },
        None if shared_gpu => Path::DeviceOneShot {
            window,
            why: OneShot::SharedGpu,
        },
        None if window <= DEVICE_ONE_SHOT_MAX_BYTES => Path::DeviceOneShot {
            window,
            why: OneShot::Small,
        },
        None => Path::DeviceTwoShots {
            window,
            limit: DEVICE_ONE_SHOT_MAX_BYTES,
        },
    }
}

/// `64 KiB`, `1 MiB`, `1000 bytes`.
struct Bytes(usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b >= 1 << 20 && b % (1 << 20) == 0 => write!(f, "{} MiB", b >> 20),
            b if b >= 1 << 10 && b % (1 << 10) == 0 => write!(f, "{} KiB", b >> 10),
            b => write!(f, "{b} bytes"),
        }
    }
}

/// An algorithm in words, as it runs `op`.
fn words(op: CollectiveOp, algo: Algo) -> &'static str {
    match (op, algo) {
        (CollectiveOp::SendRecv, _) => "one message",
        (CollectiveOp::Broadcast | CollectiveOp::Reduce, Algo::Ring) => "chain",
        (_, Algo::Ring) => "ring",
        (_, Algo::Tree) => "binomial tree",
        (_, Algo::Hier) => "hierarchical, two levels",
        (_, Algo::Doubling) => "recursive doubling",
        (_, Algo::Halving) => "recursive halving and doubling",
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Eager { ranks, limit } => write!(
                f,
                "eager slots on the control pages (every rank on this host, at most {} \
                 with {ranks} ranks, HETCCL_ALGO=auto)",
                Bytes(*limit)
            ),
            Path::Direct => f.write_str(
                "direct, reading the peers' shared buffers (every rank on this host, and \
                 this rank's buffers come from alloc_shared)",
            ),
            Path::Links(l) => l.fmt(f),
            Path::DeviceOneShot { window, why } => {
                write!(
                    f,
                    "device one shot: every rank reduces the whole {} window (",
                    Bytes(*window)
                )?;
                match why {
                    OneShot::Configured(max) => {
                        write!(f, "HETCCL_DEVICE_ONE_SHOT_BYTES={max})")
                    }
                    OneShot::SharedGpu => f.write_str(
                        "the ranks share one GPU, where every fence is a context switch)",
                    ),
                    OneShot::Small => write!(
                        f,
                        "at most {}, where a second fence costs more than the reads it saves)",
                        Bytes(DEVICE_ONE_SHOT_MAX_BYTES)
                    ),
                }
            }
            Path::DeviceTwoShots { window, limit } => write!(
                f,
                "device two shots: each rank reduces its segment of the {} window, then \
                 copies the others' (more than {} reduced whole)",
                Bytes(*window),
                Bytes(*limit)
            ),
        }
    }
}

impl fmt::Display for Links {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.call.op;
        write!(f, "links: {}", words(op, self.algo))?;
        if !matches!(op, CollectiveOp::Barrier | CollectiveOp::SendRecv) {
            write!(f, ", {} chunks", Bytes(self.chunk_bytes))?;
        }
        if op == CollectiveOp::AllReduce && self.algo == Algo::Ring {
            match self.ring_order {
                RingOrder::Wave => f.write_str(", in a wave")?,
                RingOrder::PieceByPiece => f.write_str(", piece by piece")?,
            }
        }
        if self.compressed {
            f.write_str(", compressed")?;
        }
        f.write_str(" (")?;
        match self.chosen {
            Chosen::OnlyForm => write!(f, "{op} has no other form")?,
            Chosen::Setting(a) => write!(f, "HETCCL_ALGO={}", a.name())?,
            Chosen::CostModel => f.write_str("the cost model's cheapest")?,
        }
        match self.fallback {
            None => {}
            Some((asked, Fallback::NoCompressedForm)) => {
                write!(f, ", but {} has no compressed form", words(op, asked))?
            }
            Some((asked, Fallback::TooLarge)) => write!(
                f,
                ", but {} swaps whole messages, at most {}",
                words(op, asked),
                Bytes(DOUBLING_MAX_BYTES)
            )?,
            Some((asked, Fallback::NoSuchForm)) => {
                write!(f, ", but {} has no {op} form", words(op, asked))?
            }
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_device_all_reduces_go_hierarchical_once_a_host_holds_two_ranks() {
        use DeviceAcrossHosts::{Flat, Hierarchical};
        assert_eq!(
            device_across_hosts(&[3, 2, 1], true),
            Hierarchical { fewest: 1 }
        );
        assert_eq!(
            device_across_hosts(&[2, 2], true),
            Hierarchical { fewest: 2 }
        );
        assert_eq!(
            device_across_hosts(&[1, 1, 1], true),
            Flat(FlatWhy::OneRankPerHost)
        );
        assert_eq!(device_across_hosts(&[4], true), Flat(FlatWhy::OneHost));
        assert_eq!(device_across_hosts(&[2, 2], false), Flat(FlatWhy::Op));
    }

    #[test]
    fn device_buffers_take_ipc_on_one_host_and_staging_across_hosts() {
        use DevicePath::{Auto, Ipc, Staged};
        assert_eq!(device_path(Auto, true), Some(Ipc));
        assert_eq!(device_path(Auto, false), Some(Staged));
        assert_eq!(device_path(Ipc, true), Some(Ipc));
        assert_eq!(device_path(Ipc, false), None);
        assert_eq!(device_path(Staged, true), Some(Staged));
        assert_eq!(device_path(Staged, false), Some(Staged));
        for p in [Auto, Ipc, Staged] {
            assert_eq!(DevicePath::parse(p.name()), Some(p));
        }
        assert_eq!(DevicePath::parse("nvlink"), None);
    }
    use crate::topology::{cpu_nodes, Topology};

    /// What the communicator would tell [`select`] about `t` under the default settings
    /// (`algo`, shared memory on unless `tcp`), control pages where every rank shares a host.
    fn facts<'a>(model: &'a LinkModel, t: &Topology, algo: AlgoChoice, tcp: bool) -> Facts<'a> {
        Facts {
            world_size: t.world_size(),
            nodes: t.nodes.len(),
            control_pages: t.nodes.len() == 1 && !tcp && t.world_size() > 1,
            shm_disable: tcp,
            algo,
            chunk_bytes: 512 << 10,
            pipeline_depth: 4,
            model,
        }
    }

    fn f32_sum(bytes: usize) -> Call {
        Call {
            in_place: true,
            ..Call::new(CollectiveOp::AllReduce, DataType::F32, bytes / 4)
        }
    }

    fn links(p: &Path) -> &Links {
        match p {
            Path::Links(l) => l,
            p => panic!("not over links: {p}"),
        }
    }

    #[test]
    fn a_mebibyte_all_reduce_on_four_ranks_over_tcp() {
        // Four hosts, one rank each.
        let t = cpu_nodes(&[1, 1, 1, 1]);
        let m = LinkModel::of(&t);
        let p = select(
            &f32_sum(1 << 20),
            &facts(&m, &t, AlgoChoice::Auto, false),
            CompressMode::Off,
            || unreachable!("not on one host"),
        );
        let l = links(&p);
        assert_eq!(
            (l.algo, l.chunk_bytes, l.ring_order, l.compressed, l.chosen),
            (
                Algo::Halving,
                128 << 10,
                RingOrder::Wave,
                false,
                Chosen::CostModel
            )
        );
        assert_eq!(l.call, f32_sum(1 << 20));
        assert_eq!(
            p.to_string(),
            "links: recursive halving and doubling, 128 KiB chunks (the cost model's cheapest)"
        );
        // One host over TCP: the same with a CPU per rank, the ring on two CPUs.
        for (cpus, algo) in [(4, Algo::Halving), (2, Algo::Ring)] {
            let mut t = cpu_nodes(&[4]);
            t.disable_shm();
            t.ranks.iter_mut().for_each(|r| r.cpus = cpus);
            let m = LinkModel::of(&t);
            let p = select(
                &f32_sum(1 << 20),
                &facts(&m, &t, AlgoChoice::Auto, true),
                CompressMode::Off,
                || false,
            );
            let l = links(&p);
            assert_eq!(
                (l.algo, l.chunk_bytes, l.ring_order),
                (algo, 128 << 10, RingOrder::Wave),
                "{cpus} CPUs"
            );
        }
        let mut t = cpu_nodes(&[4]);
        t.disable_shm();
        t.ranks.iter_mut().for_each(|r| r.cpus = 2);
        let m = LinkModel::of(&t);
        let p = select(
            &f32_sum(1 << 20),
            &facts(&m, &t, AlgoChoice::Auto, true),
            CompressMode::Off,
            || false,
        );
        assert_eq!(
            p.to_string(),
            "links: ring, 128 KiB chunks, in a wave (the cost model's cheapest)"
        );
    }

    #[test]
    fn two_ranks_over_shared_memory_reduce_whole_blocks() {
        let at = |t: &Topology, bytes: usize, tcp: bool| {
            let m = LinkModel::of(t);
            let f = facts(&m, t, AlgoChoice::Auto, tcp);
            links(&select(&f32_sum(bytes), &f, CompressMode::Off, || false)).chunk_bytes
        };
        let pair = cpu_nodes(&[2]);
        // bytes -> chunk: half the message up to the configured 512 KiB, 128 KiB at least.
        for (bytes, chunk) in [
            (20 << 10, 128 << 10),
            (256 << 10, 128 << 10),
            (512 << 10, 256 << 10),
            ((1 << 20) + 4, 512 << 10),
            // 150 001 elements: blocks of 75 001 and 75 000, 300 004 bytes at most.
            (600_004, 300_032),
            (1 << 20, 512 << 10),
            (4 << 20, 512 << 10),
            (256 << 20, 512 << 10),
        ] {
            assert_eq!(at(&pair, bytes, false), chunk, "{bytes} bytes");
        }
        assert_eq!(shm_pair_chunk(1 << 20, 256 << 10), 256 << 10);
        // The quarter blocks elsewhere: over TCP, with 4 ranks, across hosts.
        let mut tcp = cpu_nodes(&[2]);
        tcp.disable_shm();
        assert_eq!(at(&tcp, 1 << 20, true), 128 << 10);
        assert_eq!(at(&cpu_nodes(&[4]), 2 << 20, false), 128 << 10);
        assert_eq!(at(&cpu_nodes(&[1, 1]), 1 << 20, false), 128 << 10);
        // Other collectives of two ranks keep theirs.
        let m = LinkModel::of(&pair);
        let f = facts(&m, &pair, AlgoChoice::Auto, false);
        let rs = Call::new(CollectiveOp::ReduceScatter, DataType::F32, 1 << 18);
        assert_eq!(
            links(&select(&rs, &f, CompressMode::Off, || false)).chunk_bytes,
            m.chunk_for(CollectiveOp::ReduceScatter, rs.bytes(), 2, 512 << 10)
        );
    }

    #[test]
    fn small_all_reduces_on_one_host_take_the_eager_slots_up_to_the_limit() {
        for (n, limit) in [(2, 4 << 10), (3, 64 << 10), (4, 16 << 10), (8, 16 << 10)] {
            let t = cpu_nodes(&[n]);
            let m = LinkModel::of(&t);
            let auto = facts(&m, &t, AlgoChoice::Auto, false);
            let at = |bytes: usize, f: &Facts<'_>, mode, shared: bool| {
                select(&f32_sum(bytes), f, mode, || shared)
            };
            assert_eq!(eager_limit(n), limit);
            assert_eq!(
                at(limit, &auto, CompressMode::Off, true),
                Path::Eager { ranks: n, limit },
                "{n} ranks"
            );
            // One element more: shared buffers read in place, private ones over links.
            assert_eq!(at(limit + 4, &auto, CompressMode::Off, true), Path::Direct);
            let private = at(limit + 4, &auto, CompressMode::Off, false);
            assert!(matches!(private, Path::Links(_)), "{private}");
            // Past the slots, 4 and more ranks take halving, not doubling's whole-message
            // rounds; 2 ranks swap once by doubling; 3 ranks, past doubling's 64 KiB,
            // the ring.
            let want = match n {
                2 => Algo::Doubling,
                3 => Algo::Ring,
                _ => Algo::Halving,
            };
            assert_eq!(links(&private).algo, want, "{n} ranks");
            // A forced algorithm (unless the buffers are shared), compression or no
            // control pages: links.
            let ring = facts(&m, &t, AlgoChoice::Ring, false);
            assert_eq!(
                links(&at(4, &ring, CompressMode::Off, false)).algo,
                Algo::Ring
            );
            assert_eq!(at(4, &ring, CompressMode::Off, true), Path::Direct);
            assert!(links(&at(4, &auto, CompressMode::All, true)).compressed);
            let bare = Facts {
                control_pages: false,
                ..auto
            };
            assert_eq!(
                links(&at(4, &bare, CompressMode::Off, true)).chosen,
                Chosen::CostModel
            );
        }
        let t = cpu_nodes(&[2]);
        let m = LinkModel::of(&t);
        assert_eq!(
            select(
                &f32_sum(4),
                &facts(&m, &t, AlgoChoice::Auto, false),
                CompressMode::Off,
                || true
            )
            .to_string(),
            "eager slots on the control pages (every rank on this host, at most 4 KiB with \
             2 ranks, HETCCL_ALGO=auto)"
        );
    }

    #[test]
    fn fallbacks_say_what_was_asked_and_why_another_runs() {
        let t = cpu_nodes(&[1, 1, 1, 1]);
        let m = LinkModel::of(&t);
        let run = |call: &Call, algo, mode| {
            select(call, &facts(&m, &t, algo, false), mode, || false).to_string()
        };
        assert_eq!(
            run(&f32_sum(1 << 20), AlgoChoice::Doubling, CompressMode::Off),
            "links: ring, 128 KiB chunks, in a wave (HETCCL_ALGO=doubling, but recursive \
             doubling swaps whole messages, at most 64 KiB)"
        );
        assert_eq!(
            run(&f32_sum(64 << 10), AlgoChoice::Doubling, CompressMode::Off),
            "links: recursive doubling, 128 KiB chunks (HETCCL_ALGO=doubling)"
        );
        assert_eq!(
            run(&f32_sum(1 << 10), AlgoChoice::Auto, CompressMode::Inter),
            "links: binomial tree, 128 KiB chunks, compressed (the cost model's cheapest, \
             but recursive doubling has no compressed form)"
        );
        let bcast = Call::new(CollectiveOp::Broadcast, DataType::U8, 1 << 10);
        assert_eq!(
            run(&bcast, AlgoChoice::Halving, CompressMode::Off),
            "links: chain, 512 KiB chunks (HETCCL_ALGO=halving, but recursive halving and \
             doubling has no broadcast form)"
        );
        assert_eq!(
            run(&bcast, AlgoChoice::Auto, CompressMode::All),
            "links: binomial tree, 512 KiB chunks (the cost model's cheapest)"
        );
        let rs = Call::new(CollectiveOp::ReduceScatter, DataType::F32, 1 << 18);
        assert_eq!(
            run(&rs, AlgoChoice::Halving, CompressMode::Off),
            "links: ring, 256 KiB chunks (reduce_scatter has no other form)"
        );
        let barrier = Call::new(CollectiveOp::Barrier, DataType::U8, 1);
        assert_eq!(
            run(&barrier, AlgoChoice::Ring, CompressMode::Off),
            "links: binomial tree (barrier has no other form)"
        );
        let send = Call::new(CollectiveOp::SendRecv, DataType::F64, 10);
        assert_eq!(
            run(&send, AlgoChoice::Auto, CompressMode::All),
            "links: one message (send/recv has no other form)"
        );
        // Exact where compression does not apply: other dtypes and reductions.
        for call in [
            Call::new(CollectiveOp::AllReduce, DataType::F64, 128),
            f32_sum(1 << 10).with_redop(ReduceOp::Max),
        ] {
            let p = select(
                &call,
                &facts(&m, &t, AlgoChoice::Auto, false),
                CompressMode::All,
                || false,
            );
            assert_eq!(
                (links(&p).algo, links(&p).compressed),
                (Algo::Doubling, false)
            );
        }
        // A compressed average runs as an in-place sum.
        let avg =
            Call::new(CollectiveOp::AllReduce, DataType::F32, 1 << 18).with_redop(ReduceOp::Avg);
        let p = select(
            &avg,
            &facts(&m, &t, AlgoChoice::Auto, false),
            CompressMode::Inter,
            || false,
        );
        assert_eq!(
            links(&p).call,
            Call {
                in_place: true,
                redop: ReduceOp::Sum,
                ..avg
            }
        );
    }

    #[test]
    fn the_schedule_runs_what_the_collective_has_a_form_for() {
        use CollectiveOp::*;
        let big = DOUBLING_MAX_BYTES + 1;
        for (op, bytes, asked, runs, why) in [
            (
                AllReduce,
                DOUBLING_MAX_BYTES,
                Algo::Doubling,
                Algo::Doubling,
                None,
            ),
            (
                AllReduce,
                big,
                Algo::Doubling,
                Algo::Ring,
                Some(Fallback::TooLarge),
            ),
            (AllReduce, big, Algo::Halving, Algo::Halving, None),
            (Broadcast, 4, Algo::Tree, Algo::Tree, None),
            (
                Broadcast,
                4,
                Algo::Hier,
                Algo::Ring,
                Some(Fallback::NoSuchForm),
            ),
            (ReduceScatter, 4, Algo::Ring, Algo::Ring, None),
            (
                AllGather,
                4,
                Algo::Doubling,
                Algo::Ring,
                Some(Fallback::NoSuchForm),
            ),
            (
                Reduce,
                4,
                Algo::Tree,
                Algo::Ring,
                Some(Fallback::NoSuchForm),
            ),
            (
                Barrier,
                1,
                Algo::Ring,
                Algo::Tree,
                Some(Fallback::NoSuchForm),
            ),
            (SendRecv, 4, Algo::Ring, Algo::Ring, None),
        ] {
            assert_eq!(runnable(op, bytes, asked), (runs, why), "{op} {asked:?}");
        }
        let flat = Shape::flat(4);
        let two_by_two = Shape::of(&[vec![0, 1], vec![2, 3]]);
        assert!(candidate(Algo::Doubling, &flat, DOUBLING_MAX_BYTES));
        assert!(!candidate(Algo::Doubling, &flat, big));
        assert!(candidate(Algo::Halving, &flat, big));
        assert!(!candidate(
            Algo::Halving,
            &Shape {
                pairwise_max_bytes: 0,
                ..flat
            },
            1
        ));
        let oversubscribed = Shape {
            pairwise_max_bytes: OVERSUBSCRIBED_PAIRWISE_MAX_BYTES,
            ..flat
        };
        assert!(candidate(Algo::Halving, &oversubscribed, 512 << 10));
        assert!(!candidate(Algo::Halving, &oversubscribed, (512 << 10) + 4));
        assert!(!candidate(Algo::Halving, &two_by_two, big));
        assert!(candidate(Algo::Hier, &two_by_two, big));
        assert!(!candidate(Algo::Hier, &flat, big));
        assert!(!candidate(Algo::Hier, &Shape::of(&[vec![0], vec![1]]), big));
        assert_eq!(candidates(Barrier), [Algo::Tree]);
        assert_eq!(candidates(Broadcast), [Algo::Ring, Algo::Tree]);
    }

    #[test]
    fn nothing_moves_for_empty_calls_and_a_lone_rank_in_place() {
        let none = Call::new(CollectiveOp::AllReduce, DataType::F32, 0);
        assert!(moves_nothing(&none, 4));
        assert!(!moves_nothing(
            &Call::new(CollectiveOp::Barrier, DataType::U8, 0),
            4
        ));
        assert!(!moves_nothing(
            &Call::new(CollectiveOp::SendRecv, DataType::U8, 0),
            4
        ));
        assert!(moves_nothing(&f32_sum(4), 1));
        assert!(!moves_nothing(
            &Call::new(CollectiveOp::AllReduce, DataType::F32, 1),
            1
        ));
        assert!(!moves_nothing(&f32_sum(4), 2));
    }

    #[test]
    fn device_windows_take_one_shot_when_small_shared_or_configured() {
        let k = 1 << 10;
        for (window, shared, configured, want) in [
            (256 * k, false, None, Some(OneShot::Small)),
            (256 * k + 1, false, None, None),
            (64 << 20, true, None, Some(OneShot::SharedGpu)),
            (
                1 << 20,
                false,
                Some(1 << 20),
                Some(OneShot::Configured(1 << 20)),
            ),
            (4, true, Some(0), None),
        ] {
            let p = device_all_reduce(window, shared, configured);
            match want {
                Some(why) => assert_eq!(p, Path::DeviceOneShot { window, why }),
                None => assert!(matches!(p, Path::DeviceTwoShots { .. }), "{p}"),
            }
        }
        assert_eq!(
            device_all_reduce(1 << 20, false, None).to_string(),
            "device two shots: each rank reduces its segment of the 1 MiB window, then copies \
             the others' (more than 256 KiB reduced whole)"
        );
        assert_eq!(
            device_all_reduce(4 << 10, false, None).to_string(),
            "device one shot: every rank reduces the whole 4 KiB window (at most 256 KiB, \
             where a second fence costs more than the reads it saves)"
        );
    }
}
