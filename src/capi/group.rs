//! `hetcclGroupStart` / `hetcclGroupEnd`: calls made between them are checked at once
//! and run at the outermost `hetcclGroupEnd`, as NCCL does. Group state is per thread.
//!
//! At `hetcclGroupEnd`:
//!
//! 1. Deferred `hetcclCommInitRank` calls run concurrently (one thread each), so one
//!    thread can create the communicators of several ranks, as with NCCL.
//! 2. Operations are split by communicator; with several communicators each gets a
//!    thread, so one thread driving several ranks cannot block on the first rank's
//!    collective while the second rank's half was never issued.
//! 3. Per communicator, collectives run in the order they were called, then the
//!    point-to-point operations.
//!
//! Point-to-point order. A rank's progress thread finishes one send or receive before
//! it starts the next, and a send larger than the link's buffering only completes
//! while the peer receives. Run in call order, "send right, then receive from left"
//! on every rank would block every rank in its send. So the operations are reordered
//! to a pairwise-consistent order: by peer ascending; with a higher peer the rank
//! sends first and then receives, with a lower peer it receives first. Messages
//! between two ranks in one direction keep their call order (so they match up). Any
//! rank blocked on peer q then waits for q to reach their pair; q can only be busy with
//! a pair that comes earlier in the global (lower rank, higher rank) order, so the
//! chain of waits ends at two ranks working on the same pair — which complete. The
//! cost: exchanges with different peers run one after another, not at once (a ring
//! shift over n ranks takes up to n steps instead of one). Sends to and receives from
//! the calling rank itself are matched in call order and copied.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use super::handle::Entry;
use super::handle::{self, hetcclComm_t};
use super::ops::{self, Op};
use super::status::{hetcclResult_t, Failure};
use crate::communicator::Communicator;
use crate::config::Config;
use crate::error::Result;

/// Where `hetcclCommInitRank` writes the handle (valid until `hetcclGroupEnd` returns).
#[derive(Clone, Copy, Debug)]
pub struct OutPtr(pub *mut hetcclComm_t);

/// A `hetcclCommInitRank` waiting for `hetcclGroupEnd`.
#[derive(Debug)]
pub struct PendingInit {
    /// Where the handle goes.
    pub out: OutPtr,
    /// Fully resolved settings of the rank.
    pub cfg: Config,
}

#[derive(Debug)]
enum Deferred {
    Init(Box<PendingInit>),
    Op(Op),
}

#[derive(Debug, Default)]
struct GroupState {
    depth: usize,
    deferred: Vec<Deferred>,
    failure: Option<Failure>,
}

thread_local! {
    static GROUP: RefCell<GroupState> = RefCell::new(GroupState::default());
}

/// True between `hetcclGroupStart` and the matching outermost `hetcclGroupEnd`.
pub fn active() -> bool {
    GROUP.with(|g| g.borrow().depth > 0)
}

/// `hetcclGroupStart`.
pub fn start() {
    GROUP.with(|g| g.borrow_mut().depth += 1);
}

/// Remembers the first failed call of the open group: `hetcclGroupEnd` reports it
/// and runs nothing (a group is launched whole or not at all).
pub fn note_failure(f: &Failure) {
    GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth > 0 && g.failure.is_none() {
            g.failure = Some(Failure {
                code: f.code,
                message: format!("a call in this group failed: {}", f.message),
            });
        }
    })
}

/// Runs `op` now, or defers it to `hetcclGroupEnd` inside a group.
///
/// # Safety
/// As [`Op::run`]; inside a group the buffers must stay valid until `hetcclGroupEnd`.
pub unsafe fn submit(op: Op) -> std::result::Result<(), Failure> {
    let deferred = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return Some(op);
        }
        g.deferred.push(Deferred::Op(op));
        None
    });
    match deferred {
        // SAFETY: forwarded contract.
        Some(op) => unsafe { op.run() }.map_err(Failure::from),
        None => Ok(()),
    }
}

/// Creates a communicator now, or at `hetcclGroupEnd` inside a group.
///
/// # Safety
/// `out` must be writable until the communicator is created.
pub unsafe fn submit_init(init: PendingInit) -> std::result::Result<(), Failure> {
    let now = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.depth == 0 {
            return Some(init);
        }
        g.deferred.push(Deferred::Init(Box::new(init)));
        None
    });
    match now {
        Some(init) => {
            let comm = super::init_communicator(init.cfg)?;
            // SAFETY: the caller's contract on `out` (checked non-NULL).
            unsafe { *init.out.0 = handle::register(comm) };
            Ok(())
        }
        None => Ok(()),
    }
}

/// `hetcclGroupEnd`.
pub fn end() -> std::result::Result<(), Failure> {
    let finished = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        match g.depth {
            0 => Err(Failure::usage(
                "hetcclGroupEnd",
                "no group is open on this thread (call hetcclGroupStart first)",
            )),
            1 => {
                g.depth = 0;
                Ok(Some((std::mem::take(&mut g.deferred), g.failure.take())))
            }
            _ => {
                g.depth -= 1;
                Ok(None)
            }
        }
    })?;
    let Some((deferred, failure)) = finished else {
        return Ok(());
    };
    if let Some(f) = failure {
        return Err(f);
    }
    let mut inits = Vec::new();
    let mut ops = Vec::new();
    for d in deferred {
        match d {
            Deferred::Init(i) => inits.push(*i),
            Deferred::Op(o) => ops.push(o),
        }
    }
    run_inits(inits)?;
    run_ops(ops).map_err(Failure::from)
}

struct SendInit(PendingInit);
// SAFETY: the output pointer is written by the thread that carries it while the
// thread owning the pointee waits in `hetcclGroupEnd`.
unsafe impl Send for SendInit {}

impl SendInit {
    // A method, so the closure captures the whole wrapper, not its non-Send field.
    fn into_inner(self) -> PendingInit {
        self.0
    }
}

fn run_inits(inits: Vec<PendingInit>) -> std::result::Result<(), Failure> {
    if inits.is_empty() {
        return Ok(());
    }
    let results: Vec<(OutPtr, std::result::Result<Communicator, Failure>)> =
        std::thread::scope(|s| {
            let threads: Vec<_> = inits
                .into_iter()
                .map(|i| {
                    let i = SendInit(i);
                    s.spawn(move || {
                        let i = i.into_inner();
                        let r = super::init_communicator(i.cfg);
                        (i.out.0 as usize, r)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| match t.join() {
                    Ok((out, r)) => (OutPtr(out as *mut hetcclComm_t), r),
                    Err(_) => (
                        OutPtr(std::ptr::null_mut()),
                        Err(Failure {
                            code: hetcclResult_t::hetcclInternalError,
                            message: "internal error in hetcclGroupEnd: an init thread panicked"
                                .into(),
                        }),
                    ),
                })
                .collect()
        });
    let mut first = None;
    for (out, r) in results {
        let h = match r {
            Ok(c) => handle::register(c),
            Err(f) => {
                first.get_or_insert(f);
                std::ptr::null_mut()
            }
        };
        if !out.0.is_null() {
            // SAFETY: `out` was checked non-NULL by hetcclCommInitRank and the caller
            // keeps it valid until hetcclGroupEnd returns.
            unsafe { *out.0 = h };
        }
    }
    first.map_or(Ok(()), Err)
}

/// Runs a group's operations; the first error (in order of first use of each
/// communicator) is returned.
pub fn run_ops(ops: Vec<Op>) -> Result<()> {
    let mut per_comm: Vec<(Arc<Entry>, Vec<Op>)> = Vec::new();
    for op in ops {
        match per_comm.iter_mut().find(|(c, _)| Arc::ptr_eq(c, &op.comm)) {
            Some((_, v)) => v.push(op),
            None => per_comm.push((op.comm.clone(), vec![op])),
        }
    }
    match per_comm.len() {
        0 => Ok(()),
        // SAFETY: the buffers stay valid until hetcclGroupEnd returns (API contract);
        // this runs inside it.
        1 => per_comm
            .pop()
            .map_or(Ok(()), |(c, ops)| unsafe { run_comm(&c, ops) }),
        _ => std::thread::scope(|s| {
            let threads: Vec<_> = per_comm
                .into_iter()
                .map(|(c, ops)| {
                    // SAFETY: as above; the scope joins every thread before returning.
                    let ops = SendOps(ops);
                    s.spawn(move || {
                        let ops = ops.into_inner();
                        unsafe { run_comm(&c, ops) }
                    })
                })
                .collect();
            let mut first = Ok(());
            for t in threads {
                let r = t.join().unwrap_or_else(|_| {
                    Err(crate::Error::invalid(
                        "hetcclGroupEnd",
                        "a thread running a communicator's operations panicked",
                    ))
                });
                if first.is_ok() {
                    first = r;
                }
            }
            first
        }),
    }
}

struct SendOps(Vec<Op>);
// SAFETY: `Op` holds an `Arc<Communicator>` (Sync) and buffer addresses whose owner is
// blocked in `hetcclGroupEnd` until the thread carrying them has been joined.
unsafe impl Send for SendOps {}

impl SendOps {
    fn into_inner(self) -> Vec<Op> {
        self.0
    }
}

/// # Safety
/// As [`Op::run`] for every operation.
unsafe fn run_comm(comm: &Entry, ops: Vec<Op>) -> Result<()> {
    let me = comm.rank;
    let (p2p, colls): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|o| o.p2p_peer().is_some());
    for op in &colls {
        // SAFETY: forwarded contract.
        unsafe { op.run()? };
    }
    let mut to_self = VecDeque::new();
    let mut from_self = VecDeque::new();
    let mut remote = Vec::new();
    for op in p2p {
        match op.p2p_peer() {
            Some((p, true)) if p == me => to_self.push_back(op),
            Some((p, false)) if p == me => from_self.push_back(op),
            _ => remote.push(op),
        }
    }
    if to_self.len() != from_self.len() {
        return Err(crate::Error::invalid(
            "hetcclGroupEnd",
            format!(
                "rank {me} sends to itself {} times but receives from itself {} times in this \
                 group; they must pair up",
                to_self.len(),
                from_self.len()
            ),
        ));
    }
    for (s, r) in to_self.iter().zip(&from_self) {
        // SAFETY: forwarded contract.
        unsafe { ops::self_copy(s, r)? };
    }
    remote.sort_by_key(|o| pair_order(me, o));
    for op in &remote {
        // SAFETY: forwarded contract.
        unsafe { op.run()? };
    }
    Ok(())
}

/// Sort key of a point-to-point operation: its peer, then sends before receives when
/// the peer is the higher rank, receives before sends when it is the lower.
fn pair_order(me: usize, op: &Op) -> (usize, bool) {
    let (peer, is_send) = op.p2p_peer().unwrap_or((usize::MAX, false));
    (peer, is_send != (me < peer))
}

#[cfg(test)]
mod tests {
    /// The claim behind `pair_order`: replaying every rank's reordered list with
    /// blocking (unbuffered, rendezvous) sends and receives never deadlocks.
    #[test]
    fn pairwise_order_completes_rendezvous_exchanges() {
        // (peer, is_send) per rank, in call order.
        type Calls = Vec<Vec<(usize, bool)>>;
        fn ring(n: usize) -> Calls {
            (0..n)
                .map(|r| vec![((r + 1) % n, true), ((r + n - 1) % n, false)])
                .collect()
        }
        fn all_to_all(n: usize) -> Calls {
            (0..n)
                .map(|r| {
                    let mut v: Vec<(usize, bool)> =
                        (0..n).filter(|&p| p != r).map(|p| (p, true)).collect();
                    v.extend((0..n).filter(|&p| p != r).map(|p| (p, false)));
                    v
                })
                .collect()
        }
        fn order(me: usize, v: &[(usize, bool)]) -> Vec<(usize, bool)> {
            let mut v = v.to_vec();
            v.sort_by_key(|&(p, s)| (p, s != (me < p)));
            v
        }
        /// Replays blocking rendezvous exchanges: a rank's head operation completes
        /// only together with the peer's head naming it in the opposite direction.
        fn completes(lists: &Calls) -> bool {
            let n = lists.len();
            let mut pos = vec![0usize; n];
            loop {
                if (0..n).all(|r| pos[r] == lists[r].len()) {
                    return true;
                }
                let mut moved = false;
                for r in 0..n {
                    let Some(&(p, s)) = lists[r].get(pos[r]) else {
                        continue;
                    };
                    if lists[p].get(pos[p]) == Some(&(r, !s)) {
                        pos[r] += 1;
                        pos[p] += 1;
                        moved = true;
                    }
                }
                if !moved {
                    return false;
                }
            }
        }
        let reordered =
            |c: Calls| -> Calls { c.iter().enumerate().map(|(r, v)| order(r, v)).collect() };
        for n in 2..=9 {
            assert!(completes(&reordered(ring(n))), "ring of {n}");
            assert!(completes(&reordered(all_to_all(n))), "all-to-all of {n}");
            // In call order both patterns are stuck: that is why the group reorders.
            assert!(!completes(&ring(n)), "ring of {n} in call order");
            assert!(
                !completes(&all_to_all(n)),
                "all-to-all of {n} in call order"
            );
        }
    }
}
