//! Forwarding: a receive whose result a later send carries on unchanged (a ring's
//! steps) writes it into the room of that send's link as it arrives, as well as into its
//! destination, so the send need not read the destination again. Room is taken only
//! when the send is next on its link; a receive or copy is held back a little for it.

use std::time::{Duration, Instant};

use super::context::{link_error, ExecCtx};
use super::deps::Deps;
use crate::algorithm::schedule::OpKind;
use crate::error::Result;
use crate::reduce;
use crate::transport::{DirectDst, Link, MsgHeader};

/// Longest a receive is held back for its forwarding send to reach the head of its
/// link (see [`Forwarder::prepare`]).
const FORWARD_WAIT: Duration = Duration::from_micros(50);
/// Most sends a forwarding send may be queued behind for its receive to be held back.
const FORWARD_AHEAD: usize = 2;

/// Receives that write their result into the room ([`Link::send_space`]) of the link
/// whose send forwards it ([`crate::algorithm::schedule::Schedule::forwards`]) as well
/// as into their destination.
pub(super) struct Forwarder {
    /// Whether this collective may forward at all.
    enabled: bool,
    /// Room taken for the current receive's forwarding send, `(message offset, room)`.
    pub(super) spaces: Vec<(usize, DirectDst)>,
    /// That send: op, link, header.
    send: Option<(usize, usize, MsgHeader)>,
    /// Per link: payload bytes of the receive at the head of its queue delivered so far
    /// (final in the destination).
    pub(super) got: Vec<usize>,
    /// Per link: since when its head receive is held back for its forwarding send.
    held_since: Vec<Option<Instant>>,
    /// Since when the next local copy is held back for room for its forwarding send.
    copy_held_since: Option<Instant>,
}

/// What [`Forwarder::commit`] published.
pub(super) enum Committed {
    Nothing,
    Part,
    /// The whole forwarding send `j` on link `q`.
    All(usize, usize),
}

impl Forwarder {
    pub(super) fn new(links: usize, enabled: bool) -> Self {
        Forwarder {
            enabled,
            spaces: Vec::new(),
            send: None,
            got: vec![0; links],
            held_since: vec![None; links],
            copy_held_since: None,
        }
    }

    /// Before receive `i` on link `p` polls: takes room for its forwarding send when
    /// that send is next on its link and waits for nothing else, and copies into it
    /// what arrived earlier (`dst`: the receive's destination). Returns the message
    /// offset from which arriving pieces go into the room (`usize::MAX`: none), or
    /// `None` to hold the receive back: no room yet, or the send is still behind others
    /// that need only room. A hold lasts at most [`FORWARD_WAIT`], so no wait between
    /// ranks can close a cycle.
    pub(super) fn prepare(
        &mut self,
        i: usize,
        p: usize,
        deps: &Deps,
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
        dst: *const u8,
    ) -> Option<usize> {
        let hold = self.take_room(i, deps, links, ctx);
        if keep_holding(&mut self.held_since[p], hold) {
            return None;
        }
        // Bytes that arrived before the send reached the head of its link are in the
        // destination already (and still in cache): copy them into the room first, so
        // the rest can be forwarded as it arrives.
        let mut from = self.spaces.first().map_or(usize::MAX, |&(o, _)| o);
        for &(o, space) in &self.spaces {
            if o != from || o + space.len() > self.got[p] {
                break;
            }
            // SAFETY: the room is ours until committed; the destination's first
            // `got[p]` bytes are final and no op writes them meanwhile.
            unsafe {
                let room = space.slice_mut(0..space.len());
                reduce::copy_bytes(room.as_mut_ptr(), dst.add(o), room.len(), space.streaming());
            }
            from = o + space.len();
        }
        Some(from)
    }

    /// Local copy `i` from `src` into `dst`, when the send that forwards `dst` is next
    /// on a link with room: copies the bytes the room is for into it, reading `src`
    /// once, then from the room (still in cache) into `dst`, and publishes them.
    /// Returns the byte range it copied (empty: none; the caller copies the rest) and
    /// what it published, or `None` to hold the copy back while that send waits for
    /// room (at most [`FORWARD_WAIT`], as for receives): copied without the link, the
    /// source would be read twice.
    pub(super) fn copy_through(
        &mut self,
        i: usize,
        deps: &Deps,
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
        src: *const u8,
        dst: *mut u8,
    ) -> Result<Option<(std::ops::Range<usize>, Committed)>> {
        let hold = self.take_room(i, deps, links, ctx);
        if keep_holding(&mut self.copy_held_since, hold) {
            return Ok(None);
        }
        let start = self.spaces.first().map_or(0, |&(o, _)| o);
        let mut upto = start;
        for &(o, space) in &self.spaces {
            if o != upto {
                break;
            }
            let n = space.len();
            // SAFETY: the room is ours until committed; `src` and `dst` hold the
            // copy's `len` bytes (`o + n <= len`: room is lent within the message) and
            // no op touches them meanwhile.
            unsafe {
                let room = space.slice_mut(0..n);
                if space.streaming() {
                    // Streamed into the room, the bytes leave no copy in cache to take
                    // from there: read the source again (in cache) for the destination.
                    reduce::copy_streaming(room.as_mut_ptr(), src.add(o), n);
                    reduce::copy_bytes(dst.add(o), src.add(o), n, ctx.stream_copies);
                } else {
                    room.copy_from_slice(std::slice::from_raw_parts(src.add(o), n));
                    reduce::copy_bytes(dst.add(o), room.as_ptr(), n, ctx.stream_copies);
                }
            }
            upto = o + n;
        }
        if upto == start {
            return Ok(Some((0..0, Committed::Nothing)));
        }
        Ok(Some((start..upto, self.commit(upto, links, ctx)?)))
    }

    /// After the poll: publishes the room written up to message offset `upto`.
    pub(super) fn commit(
        &mut self,
        upto: usize,
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
    ) -> Result<Committed> {
        let (Some((j, q, header)), Some(&(start, _))) = (self.send, self.spaces.first()) else {
            return Ok(Committed::Nothing);
        };
        if upto == usize::MAX || upto <= start {
            return Ok(Committed::Nothing);
        }
        let Some(l) = links[q].as_mut() else {
            return Ok(Committed::Nothing);
        };
        let r = l.commit_send(&header, upto);
        Ok(if r.map_err(|e| link_error(e, l.as_mut(), ctx))? {
            Committed::All(j, q)
        } else {
            Committed::Part
        })
    }

    /// Takes room for op `i`'s forwarding send into `spaces` when that send is next on
    /// its link and waits for nothing else. Returns whether `i` should be held back for
    /// it: the send has no room yet, or is still behind others that need only room.
    fn take_room(
        &mut self,
        i: usize,
        deps: &Deps,
        links: &mut [Option<Box<dyn Link>>],
        ctx: &ExecCtx,
    ) -> bool {
        self.spaces.clear();
        self.send = None;
        match self.target_state(i, deps, links) {
            Target::Next(j, q, len) => {
                let header = ctx.header(len, None);
                if let Some(l) = links[q].as_mut() {
                    l.send_space(&header, &mut self.spaces);
                }
                self.send = Some((j, q, header));
                self.spaces.is_empty()
            }
            Target::Behind => true,
            Target::None => false,
        }
    }

    fn target_state(&self, i: usize, deps: &Deps, links: &[Option<Box<dyn Link>>]) -> Target {
        let (sched, sends, done) = (deps.sched, &deps.sends, &deps.done);
        let Some(j) = sched
            .forwards
            .get(i)
            .copied()
            .flatten()
            .filter(|_| self.enabled)
        else {
            return Target::None;
        };
        let OpKind::Send { peer: q, src } = sched.ops[j].kind else {
            return Target::None;
        };
        if !links[q].as_ref().is_some_and(|l| l.has_send_space()) {
            return Target::None;
        }
        // `j` waits for nothing but this receive; the sends ahead of it (few, or it is
        // not worth it) for nothing but room on the link.
        if !sched.ops[j].deps.iter().all(|&d| d == i || done[d]) {
            return Target::None;
        }
        let queue = &sends[q].ops[sends[q].next..];
        match queue.iter().take(FORWARD_AHEAD + 1).position(|&k| k == j) {
            Some(0) => Target::Next(j, q, src.len),
            Some(pos)
                if queue[..pos]
                    .iter()
                    .all(|&k| sched.ops[k].deps.iter().all(|&d| done[d])) =>
            {
                Target::Behind
            }
            _ => Target::None,
        }
    }
}

/// Whether an op that asks to be held back (`hold`) still is: a hold lasts at most
/// [`FORWARD_WAIT`] from its start in `since`, which is cleared when the op goes ahead.
fn keep_holding(since: &mut Option<Instant>, hold: bool) -> bool {
    if hold && since.get_or_insert_with(Instant::now).elapsed() < FORWARD_WAIT {
        return true;
    }
    *since = None;
    false
}

/// Where a receive's forwarding send stands.
enum Target {
    /// No forwarding send, or one that cannot take the result as it arrives.
    None,
    /// Send `j` of `len` bytes on link `q` is next on its link and waits only for this
    /// receive.
    Next(usize, usize, usize),
    /// The send is queued behind others on its link that need only room to go.
    Behind,
}

#[cfg(test)]
mod tests {
    use super::super::testing::ctx;
    use super::super::{execute, Buffers, ExecCtx, Job};
    use crate::config::ShmStores;
    use crate::dtype::{CollectiveOp, DataType, ReduceOp};
    use crate::error::Result;
    use crate::transport::{DirectDst, Link, MsgHeader, RecvSink};

    /// Delegates to a link and counts the pieces a receive wrote into it in place.
    struct Counted {
        inner: Box<dyn Link>,
        commits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Link for Counted {
        fn peer(&self) -> usize {
            self.inner.peer()
        }
        fn kind(&self) -> crate::transport::LinkKind {
            self.inner.kind()
        }
        fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool> {
            self.inner.poll_send(header, data)
        }
        fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool> {
            self.inner.poll_recv(sink)
        }
        fn check_peer(&mut self) -> Result<()> {
            self.inner.check_peer()
        }
        fn abort(&mut self, cause: crate::error::AbortCause) {
            self.inner.abort(cause)
        }
        fn has_send_space(&self) -> bool {
            self.inner.has_send_space()
        }
        fn send_space(&mut self, header: &MsgHeader, out: &mut Vec<(usize, DirectDst)>) {
            self.inner.send_space(header, out)
        }
        fn commit_send(&mut self, header: &MsgHeader, upto: usize) -> Result<bool> {
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.commit_send(header, upto)
        }
    }

    /// Runs `call` as a ring among `n` ranks (threads) over shared-memory links that
    /// write with `stores` and count their commits (room written in place and
    /// published); rank `r`'s input is `input(r)`. Returns every rank's output and the
    /// number of commits.
    fn ring_over_counted_shm(
        name: &str,
        n: usize,
        stores: ShmStores,
        call: &crate::algorithm::Call,
        input: impl Fn(usize) -> Vec<f32> + Sync,
    ) -> (Vec<Vec<f32>>, usize) {
        use crate::algorithm::ring::RingOrder;
        use crate::algorithm::{plan, Algo, Tuning};
        use crate::transport::shm::{segment_name, ShmGeometry, ShmLink};
        let geom = ShmGeometry {
            nslots: 4,
            slot_bytes: 4096,
        };
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut links: Vec<Vec<Option<Box<dyn Link>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let counted = |l: ShmLink| -> Option<Box<dyn Link>> {
            Some(Box::new(Counted {
                inner: Box::new(l),
                commits: commits.clone(),
            }))
        };
        let pairs = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b)));
        for (a, b) in pairs {
            let seg = segment_name(name, a, b);
            let (mut ab, mut ba) = (
                ShmLink::create(&seg, a, b, geom).unwrap(),
                ShmLink::open(&seg, b, a).unwrap(),
            );
            ab.set_stores(stores);
            ba.set_stores(stores);
            links[a][b] = counted(ab);
            links[b][a] = counted(ba);
        }
        let t = Tuning {
            chunk_bytes: 8192,
            slots: 4,
            shard_weights: None,
            inter_parts: None,
            ring_order: RingOrder::PieceByPiece,
        };
        let out_len = match call.op {
            CollectiveOp::AllGather => call.count * n,
            _ => call.count,
        };
        let outs = std::thread::scope(|sc| {
            let handles: Vec<_> = links
                .iter_mut()
                .enumerate()
                .map(|(rank, l)| {
                    let sched = plan(call, rank, n, Algo::Ring, t.clone(), &[]);
                    let input = &input;
                    sc.spawn(move || {
                        let input = input(rank);
                        let mut output = if call.in_place {
                            input.clone()
                        } else {
                            vec![-1.0; out_len]
                        };
                        let bufs = Buffers {
                            input: input.as_ptr().cast(),
                            input_len: input.len() * 4,
                            output: output.as_mut_ptr().cast(),
                            output_len: output.len() * 4,
                            scratch: std::ptr::null_mut(),
                            scratch_len: 0,
                        };
                        let c = ExecCtx {
                            rank,
                            world_size: n,
                            op: call.op,
                            dtype: DataType::F32,
                            count: call.count as u64,
                            ..ctx(rank)
                        };
                        execute(l, Job::new(&sched, &bufs, &c)).unwrap();
                        output
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (outs, commits.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn f32_call(op: CollectiveOp, count: usize, in_place: bool) -> crate::algorithm::Call {
        crate::algorithm::Call {
            op,
            dtype: DataType::F32,
            redop: ReduceOp::Sum,
            count,
            root: 0,
            in_place,
            is_send: false,
        }
    }

    /// Three ranks in a ring over shared memory: every step of the ring all-reduce but a
    /// piece's first forwards what it received, written straight into the next link,
    /// with ordinary stores or streaming ones (the result first in place, then streamed
    /// into the room).
    #[test]
    fn ring_all_reduce_forwards_results_through_shared_memory() {
        let count = 10_000;
        for stores in [ShmStores::Plain, ShmStores::Streaming, ShmStores::Auto] {
            for in_place in [false, true] {
                let call = f32_call(CollectiveOp::AllReduce, count, in_place);
                let (outs, commits) = ring_over_counted_shm("fwd-test", 3, stores, &call, |rank| {
                    (0..count).map(|i| ((rank + 1) * (i % 7)) as f32).collect()
                });
                for (rank, out) in outs.iter().enumerate() {
                    for (i, v) in out.iter().enumerate() {
                        let want = (6 * (i % 7)) as f32;
                        assert_eq!(*v, want, "{stores:?}, rank {rank} element {i}");
                    }
                }
                assert!(
                    commits > 0,
                    "{stores:?}, in place {in_place}: nothing was forwarded in place"
                );
            }
        }
    }

    /// Two ranks' all-gather has one step and nothing to forward from a receive: every
    /// commit is the local copy of the own block writing the link's room as it copies.
    #[test]
    fn all_gather_copies_its_own_block_through_the_link() {
        let count = 10_000;
        let call = f32_call(CollectiveOp::AllGather, count, false);
        for stores in [ShmStores::Plain, ShmStores::Streaming] {
            let (outs, commits) = ring_over_counted_shm("ag-copy-test", 2, stores, &call, |rank| {
                (0..count).map(|i| (rank * count + i) as f32).collect()
            });
            for (rank, out) in outs.iter().enumerate() {
                let want: Vec<f32> = (0..2 * count).map(|i| i as f32).collect();
                assert!(
                    *out == want,
                    "{stores:?}, rank {rank}: wrong all-gather output"
                );
            }
            // 40000 bytes per block in 8192-byte pieces: 5 pieces per rank, each
            // published in one commit or more when the ring had room.
            assert!(commits >= 1, "{stores:?}: no copy went through the link");
            assert!(
                commits <= 2 * 5 * 2,
                "{stores:?}: {commits} commits for 10 pieces of 2 slots"
            );
        }
    }
}
