//! Collective algorithms as pure schedules, plus the one executor that drives links.
//!
//! Algorithms never touch sockets: [`plan`] turns a collective call into a
//! [`Schedule`] (sends, receives and local copies over byte regions), which
//! [`executor::execute`] runs over whatever links the communicator holds. Schedules
//! can therefore be checked with no I/O at all ([`sim`]).
//!
//! Two files answer for every engine, this executor, the shared-memory one and device
//! collectives alike: [`select`] decides what runs for a call (which engine, which
//! algorithm, chunk, compression), and [`call`] holds the call, the header every rank
//! states it in, and the check that the ranks agree on it.

pub mod call;
pub mod cost;
pub mod device_hier;
pub mod doubling;
pub mod executor;
pub mod halving;
pub mod hierarchical;
pub mod parts;
pub mod ring;
pub mod schedule;
pub mod select;
pub mod sim;
pub mod tree;
pub mod tuning;

pub use call::Call;
pub use schedule::{BufId, Combine, Op, OpKind, Phase, Region, Schedule};

use crate::dtype::{CollectiveOp, ReduceOp};
use schedule::Builder;

/// An ordered group of ranks running one (sub-)collective; `me` indexes `members`.
#[derive(Clone, Debug)]
pub struct Group<'a> {
    /// Global ranks, in ring order.
    pub members: &'a [usize],
    /// This rank's position in `members`.
    pub me: usize,
}

impl Group<'_> {
    /// Number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }
    /// Global rank of the previous member in ring order.
    pub fn left(&self) -> usize {
        let n = self.size();
        self.members[(self.me + n - 1) % n]
    }
    /// Global rank of the next member in ring order.
    pub fn right(&self) -> usize {
        self.members[(self.me + 1) % self.size()]
    }
}

/// An algorithm family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algo {
    /// Chunked pipelined ring (chain for broadcast/reduce).
    Ring,
    /// Binomial tree.
    Tree,
    /// Two-level: intra-node reduce, inter-node ring per shard, intra-node broadcast
    /// (all-reduce only; other collectives run the ring).
    Hier,
    /// Recursive doubling: whole-message swaps in `log2 n` rounds (small all-reduces
    /// only, up to [`select::DOUBLING_MAX_BYTES`]; other collectives and larger messages
    /// run the ring).
    Doubling,
    /// Recursive halving then doubling (all-reduce only; other collectives run the
    /// ring).
    Halving,
}

impl Algo {
    /// Name for logs and tables.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::Tree => "tree",
            Algo::Hier => "hier",
            Algo::Doubling => "doubling",
            Algo::Halving => "halving",
        }
    }
}

/// Tuning knobs that shape schedules.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Tuning {
    /// Bytes per pipeline chunk.
    pub chunk_bytes: usize,
    /// Scratch slots (chunk-sized) for partial results in flight.
    pub slots: usize,
    /// Relative sizes of the hierarchical shards (`None`: equal).
    pub shard_weights: Option<Vec<f64>>,
    /// Node order and uneven parts of the hierarchical inter-node rings (`None`: node
    /// order, equal parts).
    pub inter_parts: Option<parts::RingParts>,
    /// Order of the steps of a ring all-reduce over all ranks; the same on every rank.
    pub ring_order: ring::RingOrder,
}

/// Builds this rank's schedule for `call` over all `n` ranks, grouped into `nodes`
/// (ranks of each node; used by [`Algo::Hier`], may be empty otherwise).
pub fn plan(
    call: &Call,
    rank: usize,
    n: usize,
    algo: Algo,
    t: Tuning,
    nodes: &[Vec<usize>],
) -> Schedule {
    let members: Vec<usize> = (0..n).collect();
    let g = Group {
        members: &members,
        me: rank,
    };
    let e = call.dtype.size();
    let bytes = call.count * e;
    let input = Region::new(BufId::Input, 0..bytes);
    let output = Region::new(BufId::Output, 0..bytes);
    // What the collective has a form for (the selection has already asked for it).
    let algo = select::runnable(call.op, bytes, algo).0;
    let mut b = Builder::new(algo.name());
    match call.op {
        CollectiveOp::AllReduce => {
            let src = if call.in_place { output } else { input };
            if algo == Algo::Ring && n > 1 {
                let (count, chunk) = (call.count, t.chunk_bytes);
                ring::all_reduce_into(&mut b, &g, src, output, count, e, chunk, t.ring_order);
            } else if algo == Algo::Halving && n > 1 {
                halving::all_reduce_into(&mut b, &g, src, output, call.count, e, t.chunk_bytes);
            } else if algo == Algo::Doubling && !call.in_place && doubling::reads_input(n) {
                doubling::all_reduce_into(&mut b, &g, input, output);
            } else {
                if !call.in_place {
                    copy_chunked(&mut b, input, output, t.chunk_bytes, e);
                }
                match algo {
                    Algo::Ring => {}
                    Algo::Doubling => doubling::all_reduce_inplace(&mut b, &g, output),
                    // One rank: nothing to exchange.
                    Algo::Halving => {}
                    Algo::Tree => {
                        tree::all_reduce_inplace(&mut b, &g, output, call.count, e, t.chunk_bytes)
                    }
                    Algo::Hier => hierarchical::all_reduce_inplace(
                        &mut b,
                        nodes,
                        rank,
                        output,
                        call.count,
                        e,
                        t.chunk_bytes,
                        t.shard_weights.as_deref(),
                        t.inter_parts.as_ref(),
                    ),
                }
            }
            finalize(&mut b, call.redop, output);
        }
        CollectiveOp::ReduceScatter => {
            // In place (NCCL's layout), the one buffer holds every block and the result
            // is this rank's block of it.
            let (inp, out) = if call.in_place {
                let own = rank * bytes..(rank + 1) * bytes;
                (
                    Region::new(BufId::Output, 0..bytes * n),
                    Region::new(BufId::Output, own),
                )
            } else {
                (Region::new(BufId::Input, 0..bytes * n), output)
            };
            ring::reduce_scatter(&mut b, &g, inp, out, call.count, e, t.chunk_bytes, t.slots);
            finalize(&mut b, call.redop, out);
        }
        CollectiveOp::AllGather => {
            // In place, this rank's block of the output is its input.
            let out = Region::new(BufId::Output, 0..bytes * n);
            let inp = if call.in_place {
                Region::new(BufId::Output, rank * bytes..(rank + 1) * bytes)
            } else {
                input
            };
            ring::all_gather(&mut b, &g, inp, out, call.count, e, t.chunk_bytes);
        }
        CollectiveOp::Broadcast => match algo {
            Algo::Tree => {
                tree::broadcast_inplace(&mut b, &g, output, call.count, e, t.chunk_bytes, call.root)
            }
            Algo::Ring | Algo::Hier | Algo::Doubling | Algo::Halving => {
                ring::broadcast_chain(&mut b, &g, output, call.count, e, t.chunk_bytes, call.root)
            }
        },
        CollectiveOp::Reduce => {
            // In place, the one buffer is every rank's input and the root's output.
            let inp = if call.in_place { output } else { input };
            let out = if rank == call.root {
                output
            } else {
                Region::new(BufId::Output, 0..0)
            };
            ring::reduce_chain(
                &mut b,
                &g,
                inp,
                out,
                call.count,
                e,
                t.chunk_bytes,
                call.root,
                t.slots,
            );
            if rank == call.root {
                finalize(&mut b, call.redop, output);
            }
        }
        CollectiveOp::Barrier => {
            // One byte, reduced up the tree and broadcast down: a real region, so every
            // send to the parent waits for the children's messages and nobody leaves
            // before everyone arrived (empty regions would carry no dependencies).
            let token = Region::new(BufId::Output, 0..1);
            tree::all_reduce_inplace(&mut b, &g, token, 1, 1, t.chunk_bytes);
        }
        CollectiveOp::SendRecv => {
            if call.is_send {
                b.send(call.root, input);
            } else {
                b.recv(call.root, output, Combine::Copy);
            }
        }
    }
    b.build()
}

fn copy_chunked(b: &mut Builder, src: Region, dst: Region, chunk: usize, elem: usize) {
    for r in schedule::split_chunks(src.len / elem, elem, chunk) {
        b.copy(schedule::at(src, &r), schedule::at(dst, &r));
    }
}

fn finalize(b: &mut Builder, op: ReduceOp, region: Region) {
    if op == ReduceOp::Avg {
        b.finalize(region);
    }
}
