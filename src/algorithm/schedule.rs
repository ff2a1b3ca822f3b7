//! Schedules: what one rank does in one collective, as pure data.
//!
//! A schedule is a list of [`Op`]s over three byte buffers (the caller's input, the
//! caller's output, and a bounded scratch area): sends, receives (copied into place or
//! reduced with what is there), local copies and local reductions. Sends and receives to one peer happen
//! in list order (links are FIFO); an op starts once every op it depends on is done.
//! The [`Builder`] derives those dependencies from the regions each op reads and
//! writes (read-after-write, write-after-read, write-after-write), so algorithm code
//! only says *what* moves and can never forget a hazard.

use std::ops::Range;

/// Which buffer a region lies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BufId {
    /// The caller's send buffer (read only).
    Input,
    /// The caller's receive buffer (for in-place calls, the one buffer).
    Output,
    /// Bounded scratch owned by the communicator.
    Scratch,
}

/// A byte range in one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    /// The buffer.
    pub buf: BufId,
    /// Start, in bytes.
    pub offset: usize,
    /// Length, in bytes.
    pub len: usize,
}

impl Region {
    /// A region of `buf` covering `range` (bytes).
    pub fn new(buf: BufId, range: Range<usize>) -> Self {
        Region {
            buf,
            offset: range.start,
            len: range.end - range.start,
        }
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.buf == other.buf
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }
}

/// How received bytes land in the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// `dst = incoming`
    Copy,
    /// `dst = dst (op) incoming`
    Accumulate,
    /// `dst = src (op) incoming`, `src` the same length as `dst`.
    From(Region),
    /// `dst = incoming (op) src`: [`Combine::From`] with the operands the other way
    /// round, for a schedule whose peer holds the left operand (recursive doubling's
    /// upper member), so both sides form the same bits.
    FromAfter(Region),
}

impl Combine {
    /// The region a `From` or `FromAfter` receive combines with the incoming bytes.
    pub fn operand(self) -> Option<Region> {
        match self {
            Combine::From(src) | Combine::FromAfter(src) => Some(src),
            Combine::Copy | Combine::Accumulate => None,
        }
    }
}

/// One step of a schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Send `src` to `peer` as one message.
    Send {
        /// Destination rank.
        peer: usize,
        /// Bytes to send.
        src: Region,
    },
    /// Receive one message from `peer` into `dst`.
    Recv {
        /// Source rank.
        peer: usize,
        /// Where it lands.
        dst: Region,
        /// How it is combined with what is there.
        combine: Combine,
    },
    /// Local copy `dst = src`.
    Copy {
        /// From.
        src: Region,
        /// To (same length).
        dst: Region,
    },
    /// Local reduction `dst = dst (op) src`.
    Reduce {
        /// The right operand.
        src: Region,
        /// The left operand and the result (same length).
        dst: Region,
    },
}

/// The part of a collective an op belongs to, for the time each part takes (metrics
/// and the trace). Ops of different phases may interleave in a schedule (a ring's
/// pieces run their steps in a wave); a phase is over when its last op is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    /// Not part of a named phase (trees, doubling, copies, single-form collectives).
    #[default]
    Unnamed = 0,
    /// A flat ring's reduce-scatter steps.
    ReduceScatter = 1,
    /// A flat ring's all-gather steps.
    AllGather = 2,
    /// Hierarchical step 1: every shard reduced into its owner inside the node.
    IntraReduceScatter = 3,
    /// Hierarchical step 2: the owners' ring all-reduce across nodes.
    InterAllReduce = 4,
    /// Hierarchical step 3: the owners hand the finished shards to their node-mates.
    IntraAllGather = 5,
}

impl Phase {
    /// Number of phases, [`Phase::Unnamed`] included.
    pub const COUNT: usize = 6;
    /// Every phase, in the order of their values.
    pub const ALL: [Phase; Phase::COUNT] = [
        Phase::Unnamed,
        Phase::ReduceScatter,
        Phase::AllGather,
        Phase::IntraReduceScatter,
        Phase::InterAllReduce,
        Phase::IntraAllGather,
    ];

    /// The phase's name in traces and metric dumps.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Unnamed => "other",
            Phase::ReduceScatter => "reduce-scatter",
            Phase::AllGather => "all-gather",
            Phase::IntraReduceScatter => "intra-node reduce-scatter",
            Phase::InterAllReduce => "inter-node all-reduce",
            Phase::IntraAllGather => "intra-node all-gather",
        }
    }
}

/// An op and the indices of the ops it waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// What to do.
    pub kind: OpKind,
    /// Earlier ops that must be done first.
    pub deps: Vec<usize>,
}

/// A complete per-rank program for one collective call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Ops in issue order.
    pub ops: Vec<Op>,
    /// Scratch bytes the ops address.
    pub scratch_bytes: usize,
    /// Region to divide by the world size at the end (`Avg`), if any.
    pub finalize: Option<Region>,
    /// Name of the algorithm, for logs.
    pub algo: &'static str,
    /// For each op, when it is a receive or a local copy: the send that forwards
    /// exactly what it wrote (a send of its destination region that depends on it),
    /// which the executor lets it write into the link directly. A ring's steps are such
    /// pairs, and an all-gather's copy of its own block with the first send of it.
    /// Filled in by [`Builder::build`].
    pub forwards: Vec<Option<usize>>,
    /// For each op, whether a later op (or the final division of `finalize`) reads
    /// bytes it wrote. A result nobody reads again within the call can be written with
    /// streaming stores. Filled in by [`Builder::build`].
    pub reread: Vec<bool>,
    /// For each op, the phase it belongs to.
    pub op_phase: Vec<Phase>,
    /// How many ops each phase has (indexed by the phase's value).
    pub phase_ops: [u32; Phase::COUNT],
    /// Payload bytes sent to each peer, `(peer, bytes)` in rank order, peers with no
    /// sends left out; what the metrics count. Filled in by [`Builder::build`].
    pub sent_to: Vec<(usize, u64)>,
    /// Payload bytes received from each peer, as `sent_to`.
    pub received_from: Vec<(usize, u64)>,
}

impl Schedule {
    /// Bytes this rank sends in total (for cost checks and tests).
    pub fn bytes_sent(&self) -> usize {
        self.ops
            .iter()
            .map(|o| match o.kind {
                OpKind::Send { src, .. } => src.len,
                _ => 0,
            })
            .sum()
    }
}

#[derive(Clone, Copy)]
struct Access {
    op: usize,
    region: Region,
    write: bool,
}

/// Builds a [`Schedule`], deriving dependencies from buffer accesses.
pub struct Builder {
    sched: Schedule,
    accesses: Vec<Access>,
    reread: Vec<bool>,
    /// The phase new ops belong to.
    phase: Phase,
    /// Set while an outer algorithm names the phase of an inner one's ops.
    phase_held: bool,
}

impl Builder {
    /// An empty schedule named `algo`.
    pub fn new(algo: &'static str) -> Self {
        Builder {
            sched: Schedule {
                algo,
                ..Schedule::default()
            },
            accesses: Vec::new(),
            reread: Vec::new(),
            phase: Phase::Unnamed,
            phase_held: false,
        }
    }

    /// The ops appended from now on belong to `phase`, unless an outer algorithm holds
    /// the phase ([`Builder::hold_phase`]).
    pub fn phase(&mut self, phase: Phase) {
        if !self.phase_held {
            self.phase = phase;
        }
    }

    /// Appends `f`'s ops as `phase`, whatever phases `f` names itself: a hierarchical
    /// all-reduce's inter-node ring is one phase of it, not a reduce-scatter and an
    /// all-gather of its own.
    pub fn hold_phase(&mut self, phase: Phase, f: impl FnOnce(&mut Builder)) {
        let (was, held) = (self.phase, self.phase_held);
        self.phase = phase;
        self.phase_held = true;
        f(self);
        self.phase_held = held;
        self.phase = was;
    }

    fn push(&mut self, kind: OpKind, reads: &[Region], writes: &[Region]) -> usize {
        let idx = self.sched.ops.len();
        let mut deps = Vec::new();
        // Scan newest first; a later access to the same bytes already orders after
        // older ones, but listing a few redundant deps is harmless and cheap.
        for a in self.accesses.iter().rev() {
            let read_after_write = a.write && reads.iter().any(|r| r.overlaps(&a.region));
            let hazard = read_after_write || writes.iter().any(|w| w.overlaps(&a.region));
            if hazard && !deps.contains(&a.op) {
                deps.push(a.op);
            }
            if read_after_write {
                self.reread[a.op] = true;
            }
        }
        deps.sort_unstable();
        for r in reads.iter().filter(|r| r.len > 0) {
            self.accesses.push(Access {
                op: idx,
                region: *r,
                write: false,
            });
        }
        for w in writes.iter().filter(|w| w.len > 0) {
            self.accesses.push(Access {
                op: idx,
                region: *w,
                write: true,
            });
        }
        self.sched.ops.push(Op { kind, deps });
        self.sched.op_phase.push(self.phase);
        self.sched.phase_ops[self.phase as usize] += 1;
        self.reread.push(false);
        idx
    }

    /// Appends a send of `src` to `peer`.
    pub fn send(&mut self, peer: usize, src: Region) -> usize {
        self.push(OpKind::Send { peer, src }, &[src], &[])
    }

    /// Appends a receive from `peer` into `dst`. `From` a region that is `dst` itself
    /// (an in-place call, whose input block is its output) is `Accumulate`; `From` a
    /// region that only partly overlaps `dst` has no meaning: a planner bug, caught by
    /// debug builds.
    pub fn recv(&mut self, peer: usize, dst: Region, combine: Combine) -> usize {
        let combine = match combine {
            Combine::From(src) if src == dst => Combine::Accumulate,
            Combine::From(src) | Combine::FromAfter(src) => {
                debug_assert!(!src.overlaps(&dst), "receive into {dst:?} from {src:?}");
                combine
            }
            c => c,
        };
        match combine {
            Combine::Copy => self.push(OpKind::Recv { peer, dst, combine }, &[], &[dst]),
            Combine::Accumulate => self.push(OpKind::Recv { peer, dst, combine }, &[dst], &[dst]),
            Combine::From(src) | Combine::FromAfter(src) => {
                self.push(OpKind::Recv { peer, dst, combine }, &[src], &[dst])
            }
        }
    }

    /// Appends a local copy.
    pub fn copy(&mut self, src: Region, dst: Region) -> usize {
        self.push(OpKind::Copy { src, dst }, &[src], &[dst])
    }

    /// Appends a local reduction `dst = dst (op) src`.
    pub fn reduce(&mut self, src: Region, dst: Region) -> usize {
        self.push(OpKind::Reduce { src, dst }, &[src, dst], &[dst])
    }

    /// Reserves scratch so that offsets below `bytes` are valid.
    pub fn scratch(&mut self, bytes: usize) {
        self.sched.scratch_bytes = self.sched.scratch_bytes.max(bytes);
    }

    /// Marks `region` for the final division by the world size.
    pub fn finalize(&mut self, region: Region) {
        self.sched.finalize = Some(region);
    }

    /// The finished schedule.
    pub fn build(mut self) -> Schedule {
        let ops = &self.sched.ops;
        let mut forwards = vec![None; ops.len()];
        for (j, op) in ops.iter().enumerate() {
            let OpKind::Send { src, .. } = op.kind else {
                continue;
            };
            for &d in &op.deps {
                let forwarded = matches!(ops[d].kind,
                    OpKind::Recv { dst, .. } | OpKind::Copy { dst, .. } if dst == src);
                if forwarded && src.len > 0 && forwards[d].is_none() {
                    forwards[d] = Some(j);
                }
            }
        }
        self.sched.forwards = forwards;
        if let Some(f) = self.sched.finalize {
            for a in self
                .accesses
                .iter()
                .filter(|a| a.write && a.region.overlaps(&f))
            {
                self.reread[a.op] = true;
            }
        }
        self.sched.reread = self.reread;
        let mut sent = std::collections::BTreeMap::<usize, u64>::new();
        let mut received = std::collections::BTreeMap::<usize, u64>::new();
        for o in &self.sched.ops {
            match o.kind {
                OpKind::Send { peer, src } => *sent.entry(peer).or_default() += src.len as u64,
                OpKind::Recv { peer, dst, .. } => {
                    *received.entry(peer).or_default() += dst.len as u64
                }
                _ => {}
            }
        }
        self.sched.sent_to = sent.into_iter().collect();
        self.sched.received_from = received.into_iter().collect();
        self.sched
    }
}

/// The part of `buf` at byte `range` relative to its start.
pub fn at(buf: Region, range: &Range<usize>) -> Region {
    Region::new(buf.buf, buf.offset + range.start..buf.offset + range.end)
}

/// Splits `count` elements of `elem` bytes into pipeline chunks of about
/// `chunk_bytes` (at least one, possibly empty); byte ranges.
pub fn split_chunks(count: usize, elem: usize, chunk_bytes: usize) -> Vec<Range<usize>> {
    split_even(
        count,
        (count * elem).div_ceil(chunk_bytes.max(elem)).max(1),
        elem,
    )
}

/// Splits `count` elements into `parts` contiguous ranges whose sizes differ by at
/// most one element; returns byte ranges for elements of `elem` bytes.
pub fn split_even(count: usize, parts: usize, elem: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let base = count / parts;
    let extra = count % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let n = base + usize::from(i < extra);
        out.push(start * elem..(start + n) * elem);
        start += n;
    }
    out
}

/// Splits `count` elements into `weights.len()` contiguous ranges in proportion to
/// `weights` (non-negative, not all 0), each boundary rounded to the nearest element of
/// the running share; byte ranges for elements of `elem` bytes. A weight of 0 gives an
/// empty range.
pub fn split_weighted(count: usize, elem: usize, weights: &[f64]) -> Vec<Range<usize>> {
    let total: f64 = weights.iter().sum();
    let mut out = Vec::with_capacity(weights.len());
    let mut start = 0usize;
    let mut acc = 0.0;
    for (j, wj) in weights.iter().enumerate() {
        acc += wj;
        let end = if j + 1 == weights.len() {
            count
        } else {
            ((acc / total) * count as f64).round() as usize
        }
        .clamp(start, count);
        out.push(start * elem..end * elem);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_derives_hazards() {
        let a = Region::new(BufId::Output, 0..8);
        let b = Region::new(BufId::Output, 8..16);
        let mut bld = Builder::new("t");
        let s0 = bld.send(1, a); // reads a
        let r1 = bld.recv(2, a, Combine::Accumulate); // WAR on a
        let s2 = bld.send(1, b); // independent
        let r3 = bld.recv(2, b, Combine::Copy); // WAR on b
        let s4 = bld.send(1, a); // RAW on a (r1)
        let s = bld.build();
        assert_eq!(s.ops[s0].deps, Vec::<usize>::new());
        assert_eq!(s.ops[r1].deps, vec![s0]);
        assert_eq!(s.ops[s2].deps, Vec::<usize>::new());
        assert_eq!(s.ops[r3].deps, vec![s2]);
        assert_eq!(s.ops[s4].deps, vec![r1]);
    }

    #[test]
    fn builder_marks_results_read_again() {
        let a = Region::new(BufId::Output, 0..8);
        let b = Region::new(BufId::Output, 8..16);
        let c = Region::new(BufId::Scratch, 0..8);
        let mut bld = Builder::new("t");
        let r0 = bld.recv(1, a, Combine::Copy); // sent below
        let r1 = bld.recv(1, b, Combine::From(Region::new(BufId::Input, 0..8))); // final
        let s2 = bld.send(2, a);
        let r3 = bld.recv(1, c, Combine::Copy); // read by the next receive
        let r4 = bld.recv(1, c, Combine::Accumulate); // in the final division
        bld.finalize(c);
        let s = bld.build();
        assert_eq!(s.reread.len(), s.ops.len());
        assert!(s.reread[r0], "sent later");
        assert!(!s.reread[r1], "read by nothing");
        assert!(!s.reread[s2], "a send writes nothing");
        assert!(s.reread[r3], "the accumulating receive reads it");
        assert!(s.reread[r4], "divided at the end");
    }

    #[test]
    fn split_even_covers_everything() {
        assert_eq!(split_even(10, 3, 4), vec![0..16, 16..28, 28..40]);
        assert_eq!(split_even(2, 4, 2), vec![0..2, 2..4, 4..4, 4..4]);
    }

    #[test]
    fn a_receive_from_its_own_destination_accumulates() {
        let own = Region::new(BufId::Output, 16..32);
        let other = Region::new(BufId::Output, 0..16);
        let mut bld = Builder::new("t");
        bld.recv(1, own, Combine::From(own));
        bld.recv(1, own, Combine::From(other));
        let s = bld.build();
        let combines: Vec<_> = s
            .ops
            .iter()
            .map(|op| match op.kind {
                OpKind::Recv { combine, .. } => combine,
                k => panic!("{k:?}"),
            })
            .collect();
        assert_eq!(combines, vec![Combine::Accumulate, Combine::From(other)]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "receive into")]
    fn a_receive_from_a_region_half_over_its_destination_is_refused() {
        let mut bld = Builder::new("t");
        let dst = Region::new(BufId::Output, 16..32);
        bld.recv(1, dst, Combine::From(Region::new(BufId::Output, 8..24)));
    }
}
