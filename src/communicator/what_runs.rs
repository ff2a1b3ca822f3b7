//! What runs for a call, pinned call by call on communicators of several shapes: the
//! engine (nothing, the eager slots, the direct algorithms on shared buffers, or a
//! schedule over links), and for a schedule its algorithm, pipeline chunk, ring order
//! and whether its links compress. Each row asks a communicator built the way `init`
//! builds one (control pages when every rank shares the host, none with
//! `HETCCL_SHM_DISABLE=1`), with in-memory links standing in for the real ones: the
//! choice depends on the topology and the settings, never on the links themselves.

use super::testing::on_all;
use super::{Communicator, CompressMode, Path, RawIn, RawOut};
use crate::algorithm::{Algo, Call};
use crate::config::{AlgoChoice, Config};
use crate::dtype::{CollectiveOp, DataType, ReduceOp};
use crate::topology::{LinkPerf, Topology};
use crate::transport::{mem, Link};

impl Communicator {
    /// What this rank runs for `call` on these buffers, compressed by `compress`: `nothing`,
    /// `eager`, `direct`, or `links <algorithm> chunk <KiB> KiB <ring order>` with
    /// ` compressed` when some link of the call carries 16-bit values; the algorithm is
    /// `chain` for the chains of broadcast and reduce, `message` for a send or receive.
    fn what_runs(
        &self,
        call: &Call,
        input: RawIn,
        output: RawOut,
        compress: Option<CompressMode>,
    ) -> String {
        if self.skip(call) {
            return "nothing".into();
        }
        let mode = compress.unwrap_or(CompressMode::Off);
        let l = match self.choose(call, input, output, mode) {
            (Path::Eager { .. }, Some(_)) => return "eager".into(),
            (Path::Direct, Some(_)) => return "direct".into(),
            (Path::Links(l), None) => l,
            (p, d) => panic!("{p} with a shared-memory part: {}", d.is_some()),
        };
        // The schedule is what the selection says.
        assert_eq!(self.schedule(&l).algo, l.algo.name());
        let algo = match (l.call.op, l.algo) {
            (CollectiveOp::SendRecv, _) => "message",
            (CollectiveOp::Broadcast | CollectiveOp::Reduce, Algo::Ring) => "chain",
            (_, a) => a.name(),
        };
        format!(
            "links {algo} chunk {} KiB {:?}{}",
            l.chunk_bytes >> 10,
            l.ring_order,
            if l.compressed { " compressed" } else { "" }
        )
    }
}

/// CPU ranks on nodes of `sizes` ranks, `cpus` CPUs each (0: unknown); every rank is
/// this process, so the shared-buffer path finds its peers alive.
fn nodes(sizes: &[usize], cpus: usize) -> Topology {
    let mut t = crate::topology::cpu_nodes(sizes);
    for r in &mut t.ranks {
        r.pid = std::process::id();
        r.cpus = cpus;
    }
    Topology::from_ranks(t.ranks)
}

/// The communicators of `topo` under `cfg`, joined by in-memory links, with the control
/// pages `init` would attach.
#[allow(clippy::needless_range_loop)]
fn world(topo: &Topology, cfg: &Config) -> Vec<Communicator> {
    let n = topo.world_size();
    let mut topo = topo.clone();
    if cfg.shm_disable {
        topo.disable_shm();
    }
    let mut links: Vec<Vec<Option<Box<dyn Link>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for a in 0..n {
        for b in a + 1..n {
            let (la, lb) = mem::pair_with(a, b, 64 << 10, 4);
            links[a][b] = Some(Box::new(la));
            links[b][a] = Some(Box::new(lb));
        }
    }
    let mut comms: Vec<Communicator> = links
        .into_iter()
        .enumerate()
        .map(|(r, l)| Communicator::from_parts(cfg.clone(), topo.clone(), r, l, None).unwrap())
        .collect();
    std::thread::scope(|s| {
        for c in comms.iter_mut() {
            s.spawn(move || c.attach_node().unwrap());
        }
    });
    comms
}

/// Which buffers a row passes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bufs {
    /// The caller's own memory.
    Private,
    /// Buffers from `alloc_shared` on every rank.
    Shared,
}

/// One row: a call, its buffers and compression, and what runs.
struct Row {
    op: CollectiveOp,
    dtype: DataType,
    redop: ReduceOp,
    /// Elements as the call counts them.
    count: usize,
    in_place: bool,
    bufs: Bufs,
    compress: Option<CompressMode>,
    want: &'static str,
}

/// An in-place sum of `bytes / 4` f32 over private buffers.
fn all_reduce(bytes: usize, want: &'static str) -> Row {
    Row {
        op: CollectiveOp::AllReduce,
        dtype: DataType::F32,
        redop: ReduceOp::Sum,
        count: bytes / 4,
        in_place: true,
        bufs: Bufs::Private,
        compress: None,
        want,
    }
}

fn op(op: CollectiveOp, bytes: usize, want: &'static str) -> Row {
    Row {
        op,
        ..all_reduce(bytes, want)
    }
}

/// A barrier, as `Communicator::barrier` states it: one byte.
fn barrier(want: &'static str) -> Row {
    Row {
        op: CollectiveOp::Barrier,
        dtype: DataType::U8,
        count: 1,
        ..all_reduce(0, want)
    }
}

impl Row {
    fn shared(self) -> Row {
        Row {
            bufs: Bufs::Shared,
            ..self
        }
    }
    fn compressed(self, mode: CompressMode) -> Row {
        Row {
            compress: Some(mode),
            ..self
        }
    }
    fn dtype(self, dtype: DataType) -> Row {
        Row {
            dtype,
            count: self.count * 4 / dtype.size(),
            ..self
        }
    }
    fn redop(self, redop: ReduceOp) -> Row {
        Row { redop, ..self }
    }
    fn out_of_place(self) -> Row {
        Row {
            in_place: false,
            ..self
        }
    }
}

/// Asks every rank of a world of `topo` under `cfg` what runs for each row, and checks
/// that they all say what the row wants.
fn check(what: &str, topo: &Topology, cfg: Config, rows: &[Row]) {
    let comms = world(topo, &cfg);
    let n = comms.len();
    let mut wrong = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let said = on_all(&comms, |c| {
            let call = Call {
                op: row.op,
                dtype: row.dtype,
                redop: row.redop,
                count: row.count,
                root: if row.op == CollectiveOp::SendRecv {
                    (c.rank() + 1) % n
                } else {
                    0
                },
                in_place: row.in_place,
                is_send: row.op == CollectiveOp::SendRecv && c.rank() % 2 == 0,
            };
            // What the buffers hold as the communicator sees them: every block for
            // reduce-scatter's input and all-gather's output.
            let block = row.count * row.dtype.size();
            let (in_bytes, out_bytes) = match row.op {
                CollectiveOp::ReduceScatter => (block * n, block),
                CollectiveOp::AllGather => (block, block * n),
                _ => (block, block),
            };
            let (in_bytes, out_bytes) = if row.in_place {
                (out_bytes.max(in_bytes), out_bytes.max(in_bytes))
            } else {
                (in_bytes, out_bytes)
            };
            match row.bufs {
                Bufs::Private => {
                    let src = vec![0u8; in_bytes];
                    let mut dst = vec![0u8; out_bytes];
                    let input = if row.in_place {
                        (dst.as_ptr(), out_bytes)
                    } else {
                        (src.as_ptr(), in_bytes)
                    };
                    c.what_runs(&call, input, (dst.as_mut_ptr(), out_bytes), row.compress)
                }
                Bufs::Shared => {
                    let mut src = c.alloc_shared::<u8>(in_bytes).unwrap();
                    let mut dst = c.alloc_shared::<u8>(out_bytes).unwrap();
                    let input = if row.in_place {
                        (dst.as_ptr(), out_bytes)
                    } else {
                        (src.as_mut_ptr().cast_const(), in_bytes)
                    };
                    c.what_runs(&call, input, (dst.as_mut_ptr(), out_bytes), row.compress)
                }
            }
        });
        for (r, s) in said.iter().enumerate() {
            if s != row.want {
                wrong.push(format!(
                    "row {i}, {} of {} x {} ({}, {:?}, compress {:?}), rank {r}: {s:?}, not {:?}",
                    row.op, row.count, row.dtype, row.redop, row.bufs, row.compress, row.want
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
}

fn cfg() -> Config {
    Config::default()
}

fn forced(algo: AlgoChoice) -> Config {
    Config { algo, ..cfg() }
}

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[test]
fn four_ranks_on_four_hosts_over_tcp() {
    use CollectiveOp::*;
    let t = nodes(&[1, 1, 1, 1], 0);
    check(
        "4 hosts, auto",
        &t,
        cfg(),
        &[
            all_reduce(MIB, "links halving chunk 128 KiB Wave"),
            all_reduce(4, "links doubling chunk 128 KiB Wave"),
            all_reduce(64 * KIB, "links doubling chunk 128 KiB Wave"),
            all_reduce(64 * KIB + 4, "links halving chunk 128 KiB Wave"),
            all_reduce(64 * MIB, "links halving chunk 512 KiB Wave"),
            all_reduce(MIB, "links halving chunk 128 KiB Wave").out_of_place(),
            op(Broadcast, 64, "links tree chunk 512 KiB Wave"),
            op(Broadcast, 64 * MIB, "links chain chunk 512 KiB Wave"),
            op(ReduceScatter, MIB, "links ring chunk 256 KiB Wave").out_of_place(),
            op(AllGather, MIB, "links ring chunk 256 KiB Wave").out_of_place(),
            op(Reduce, MIB, "links chain chunk 256 KiB Wave").out_of_place(),
            barrier("links tree chunk 128 KiB Wave"),
            op(SendRecv, KIB, "links message chunk 128 KiB Wave"),
            op(AllReduce, 0, "nothing"),
            all_reduce(KIB, "links tree chunk 128 KiB Wave compressed")
                .compressed(CompressMode::Inter),
            all_reduce(MIB, "links halving chunk 128 KiB Wave compressed")
                .compressed(CompressMode::All),
            all_reduce(MIB, "links halving chunk 128 KiB Wave compressed")
                .compressed(CompressMode::All)
                .redop(ReduceOp::Avg)
                .out_of_place(),
            all_reduce(KIB, "links doubling chunk 128 KiB Wave")
                .compressed(CompressMode::All)
                .dtype(DataType::F64),
            all_reduce(KIB, "links doubling chunk 128 KiB Wave")
                .compressed(CompressMode::All)
                .redop(ReduceOp::Max),
            op(Broadcast, KIB, "links tree chunk 512 KiB Wave").compressed(CompressMode::All),
        ],
    );
    check(
        "4 hosts, forced",
        &t,
        forced(AlgoChoice::Doubling),
        &[
            all_reduce(64 * KIB, "links doubling chunk 128 KiB Wave"),
            all_reduce(MIB, "links ring chunk 128 KiB Wave"),
            op(Broadcast, KIB, "links chain chunk 512 KiB Wave"),
            all_reduce(KIB, "links tree chunk 128 KiB Wave compressed")
                .compressed(CompressMode::All),
        ],
    );
    check(
        "4 hosts, halving",
        &t,
        forced(AlgoChoice::Halving),
        &[
            all_reduce(4, "links halving chunk 128 KiB Wave"),
            op(ReduceScatter, MIB, "links ring chunk 256 KiB Wave").out_of_place(),
            barrier("links tree chunk 128 KiB Wave"),
        ],
    );
}

#[test]
fn ranks_of_one_host() {
    use CollectiveOp::*;
    check(
        "2 local ranks",
        &nodes(&[2], 0),
        cfg(),
        &[
            all_reduce(4, "eager"),
            all_reduce(4 * KIB, "eager"),
            all_reduce(4 * KIB + 4, "links doubling chunk 128 KiB PieceByPiece"),
            all_reduce(16 * KIB, "links doubling chunk 128 KiB PieceByPiece").out_of_place(),
            // Two ranks over shared memory move each half as one piece.
            all_reduce(MIB, "links ring chunk 512 KiB PieceByPiece"),
            all_reduce(KIB, "links tree chunk 128 KiB PieceByPiece compressed")
                .compressed(CompressMode::All),
        ],
    );
    check(
        "3 local ranks",
        &nodes(&[3], 0),
        cfg(),
        &[
            all_reduce(64 * KIB, "eager"),
            all_reduce(64 * KIB + 4, "links ring chunk 128 KiB PieceByPiece"),
        ],
    );
    check(
        "4 local ranks",
        &nodes(&[4], 0),
        cfg(),
        &[
            all_reduce(4, "eager").out_of_place(),
            all_reduce(16 * KIB, "eager").redop(ReduceOp::Max),
            // Past the slots, halving: doubling's rounds would send the whole message.
            all_reduce(16 * KIB + 4, "links halving chunk 128 KiB PieceByPiece"),
            all_reduce(64 * KIB, "links halving chunk 128 KiB PieceByPiece"),
            all_reduce(MIB, "links halving chunk 128 KiB PieceByPiece"),
            all_reduce(MIB, "direct").shared(),
            all_reduce(4, "eager").shared().out_of_place(),
            all_reduce(MIB, "links halving chunk 128 KiB PieceByPiece compressed")
                .shared()
                .compressed(CompressMode::All),
            // Compressed, so not eager: halving (doubling is no candidate here).
            all_reduce(KIB, "links halving chunk 128 KiB PieceByPiece compressed")
                .compressed(CompressMode::All),
            all_reduce(KIB, "eager").compressed(CompressMode::Inter),
            op(ReduceScatter, MIB, "direct").shared().out_of_place(),
            op(ReduceScatter, MIB, "direct").shared(),
            op(AllGather, MIB, "direct").shared().out_of_place(),
            op(AllGather, MIB, "direct").shared(),
            op(Broadcast, MIB, "direct").shared(),
            op(Broadcast, MIB, "links chain chunk 512 KiB PieceByPiece"),
            op(Reduce, MIB, "links chain chunk 256 KiB PieceByPiece").shared(),
            barrier("links tree chunk 128 KiB PieceByPiece"),
        ],
    );
    check(
        "4 local ranks, ring",
        &nodes(&[4], 0),
        forced(AlgoChoice::Ring),
        &[
            all_reduce(4, "links ring chunk 128 KiB PieceByPiece"),
            all_reduce(MIB, "direct").shared(),
        ],
    );
}

#[test]
fn ranks_of_one_host_over_tcp() {
    let tcp = Config {
        shm_disable: true,
        ..cfg()
    };
    check(
        "4 local ranks over TCP, a CPU each",
        &nodes(&[4], 4),
        tcp.clone(),
        &[
            all_reduce(4, "links doubling chunk 128 KiB Wave"),
            all_reduce(MIB, "links halving chunk 128 KiB Wave"),
            all_reduce(64 * MIB, "links halving chunk 512 KiB Wave"),
        ],
    );
    check(
        "4 local ranks over TCP on 2 CPUs",
        &nodes(&[4], 2),
        tcp,
        &[
            all_reduce(4, "links doubling chunk 128 KiB Wave"),
            all_reduce(MIB, "links ring chunk 128 KiB Wave"),
            all_reduce(64 * MIB, "links ring chunk 256 KiB Wave"),
        ],
    );
}

#[test]
fn several_hosts_and_ranks() {
    check(
        "8 hosts",
        &nodes(&[1; 8], 0),
        cfg(),
        &[
            all_reduce(64, "links doubling chunk 128 KiB Wave"),
            all_reduce(128 * KIB, "links halving chunk 128 KiB Wave"),
            all_reduce(64 * MIB, "links halving chunk 512 KiB Wave"),
        ],
    );
    check(
        "6 hosts",
        &nodes(&[1; 6], 0),
        cfg(),
        &[all_reduce(64 * MIB, "links ring chunk 512 KiB Wave")],
    );
    let mut slow = nodes(&[2, 2], 0);
    let gbit = LinkPerf {
        latency_ns: 50_000,
        bytes_per_s: 125_000_000,
    };
    for (a, b) in [(0, 2), (0, 3), (1, 2), (1, 3)] {
        slow.set_measured(a, b, gbit);
    }
    check(
        "2 hosts x 2 ranks, 1 Gbit/s between",
        &slow,
        cfg(),
        &[
            all_reduce(64 * MIB, "links hier chunk 512 KiB Wave"),
            all_reduce(KIB, "links hier chunk 128 KiB Wave"),
            all_reduce(KIB, "links hier chunk 128 KiB Wave compressed")
                .compressed(CompressMode::Inter),
            all_reduce(64 * MIB, "links hier chunk 512 KiB Wave compressed")
                .compressed(CompressMode::Inter),
        ],
    );
    check(
        "one rank",
        &nodes(&[1], 0),
        cfg(),
        &[
            all_reduce(MIB, "nothing"),
            all_reduce(MIB, "links ring chunk 256 KiB PieceByPiece").out_of_place(),
        ],
    );
}
