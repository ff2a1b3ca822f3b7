//! The collective allocation of shared buffers ([`Communicator::alloc_shared`]), and of
//! the control pages with the first of them.
//!
//! One round: every rank makes its segments (a buffer; a control page the first time),
//! all-gathers a record naming them over the communicator, maps every peer's, then
//! all-gathers whether that worked, and only then drops the ways in (closes the memfd,
//! unlinks the name), so nothing outlives the mappings. Segments are memfds opened
//! through `/proc/<pid>/fd`; when some rank cannot reach a peer's that way (another pid
//! namespace, `/proc` hidden) every rank learns it in the second exchange and the round
//! is run again with named `/dev/shm` segments.

use std::sync::atomic::Ordering;

use super::buffer::{Allocation, SharedBuf};
use super::control::{self, ctl_bytes, NodeCtl};
use super::Communicator;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::transport::shm::liveness::own_pidns;
use crate::transport::shm::segment::{self, Mapping, OwnedSegment, SegmentHandle};

/// Fixed size of one rank's record in the allocation exchange.
const RECORD_BYTES: usize = 1024;

/// What each rank says in the two rounds of an allocation.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Record {
    pid: u32,
    pidns: u64,
    ctl: Option<(SegmentHandle, u64)>,
    buf: Option<(SegmentHandle, u64)>,
    error: Option<String>,
    /// The error may go away with named segments (a memfd could not be opened).
    retry_named: bool,
}

/// Segments this rank made in one round, before they are exchanged.
struct Made {
    ctl: Option<OwnedSegment>,
    buf: OwnedSegment,
}

/// What the peers' segments became in this process.
struct Opened {
    ctl: Vec<Option<Mapping>>,
    buf: Vec<Option<Mapping>>,
}

impl Communicator {
    /// Allocates `len` elements of `T` in memory every rank of this host maps, and
    /// returns this rank's buffer. Collective: every rank calls it, in the same order
    /// relative to the other collectives, with the same `len`.
    ///
    /// When all ranks run on one host, `all_reduce`, `reduce_scatter`, `all_gather`
    /// and `broadcast` on (sub-slices of) these buffers reduce and copy straight from
    /// the peers' memory instead of through link rings; see [`SharedBuf`]. Which
    /// buffer takes part is found from the slice's address: pass `&mut buf[..]` or
    /// any sub-slice, on every rank.
    pub fn alloc_shared<T: Element>(&self, len: usize) -> Result<SharedBuf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            Error::invalid(
                "alloc_shared",
                format!("{len} elements of {} overflow the address space", T::DTYPE),
            )
        })?;
        let state = &self.shared;
        let mut next = state.next_idx.lock().unwrap_or_else(|p| p.into_inner());
        let idx = *next;
        let share = !self.cfg.shm_disable && self.local_size() > 1;
        let mut result = self.alloc_round(idx, bytes, share, false)?;
        if result.is_none() {
            tracing::info!(
                rank = self.rank,
                "shared buffer #{idx}: a peer cannot open memfd segments through /proc; \
                 using named /dev/shm segments"
            );
            result = self.alloc_round(idx, bytes, share, true)?;
        }
        let Some((ctl, alloc)) = result else {
            return Err(Error::Shm(format!(
                "rank {}: shared buffer #{idx}: peers could not map each other's segments",
                self.rank
            )));
        };
        *next += 1;
        if let Some(ctl) = ctl {
            // Only the first allocation makes control pages, under `next_idx`'s lock.
            let _ = state.ctl.set(ctl);
        }
        let me = self.local_rank();
        let mine = alloc.maps[me]
            .as_ref()
            .map(|m| m.as_ptr())
            .ok_or_else(|| Error::Shm(format!("rank {}: own buffer not mapped", self.rank)))?;
        let buf = SharedBuf::register(state, alloc, mine, len);
        tracing::debug!(
            rank = self.rank,
            bytes,
            "shared buffer #{idx}: {len} x {}, shared with {} local ranks",
            T::DTYPE,
            if share { self.local_size() } else { 1 }
        );
        Ok(buf)
    }

    /// Maps the control pages of this host's ranks when the whole job runs on one
    /// host, so that small all-reduces take the eager path with no shared buffer
    /// allocated. Collective. Pages that cannot be made are not an error (every rank
    /// learns it in the same exchange, and the calls then run over links).
    /// Numbering restarts afterwards, so the caller's first collective is still #0.
    pub(in crate::communicator) fn attach_node(&mut self) -> Result<()> {
        if self.world_size < 2
            || self.local_size() != self.world_size
            || self.cfg.shm_disable
            || self.shared.ctl.get().is_some()
        {
            return Ok(());
        }
        // The pages' flags start at the current sequence number: restart it first.
        self.restart_numbering();
        let made = match self.alloc_shared::<u8>(0) {
            Ok(_) => Ok(()),
            Err(Error::Shm(e)) => {
                tracing::info!(
                    rank = self.rank,
                    "no control pages, small all_reduce runs over links: {e}"
                );
                Ok(())
            }
            Err(e) => Err(e),
        };
        // The allocation's own exchanges went over links; the flags still say 0.
        self.seq.store(0, Ordering::Relaxed);
        made
    }

    /// One attempt at an allocation: make, exchange, open, exchange, release. `Ok(None)`
    /// when every failure was a memfd that could not be opened (retry with names).
    #[allow(clippy::type_complexity)]
    fn alloc_round(
        &self,
        idx: u64,
        bytes: usize,
        share: bool,
        named: bool,
    ) -> Result<Option<(Option<NodeCtl>, Allocation)>> {
        let rank = self.rank;
        let node = &self.topo.nodes[self.topo.node_of[rank]];
        let n = node.len();
        let me = self.local_rank();
        let need_ctl = share && self.shared.ctl.get().is_none();
        let name = |what: &str| {
            named.then(|| {
                format!(
                    "hetccl-{}-{what}-{idx}-{rank}-{:016x}-{}",
                    std::process::id(),
                    rand::random::<u64>(),
                    segment::owner_tag()
                )
            })
        };
        let made = (|| -> Result<Made> {
            let ctl = if need_ctl {
                let what = format!("rank {rank}: control page");
                let s = OwnedSegment::create(ctl_bytes(n), name("ctl").as_deref(), &what)?;
                // SAFETY: fresh zero-filled mapping of at least one page that no other
                // process has yet.
                unsafe { control::init_page(s.mapping(), rank, self.seq.load(Ordering::Relaxed)) };
                Some(s)
            } else {
                None
            };
            let what = format!("rank {rank}: shared buffer #{idx}");
            let buf = OwnedSegment::create(bytes, name("buf").as_deref(), &what)?;
            Ok(Made { ctl, buf })
        })();
        // The inode lets an opener check it mapped the segment it was told about (a pid
        // from another pid namespace would name some other process's descriptor).
        let handle = |s: &OwnedSegment| (s.handle().clone(), s.mapping().inode());
        let first = match &made {
            Ok(m) => Record {
                pid: std::process::id(),
                pidns: own_pidns(),
                ctl: m.ctl.as_ref().map(handle),
                buf: Some(handle(&m.buf)),
                ..Record::default()
            },
            Err(e) => Record {
                error: Some(e.to_string()),
                ..Record::default()
            },
        };
        let records = self.exchange(&first)?;
        let mut made = made?;
        if let Some((r, e)) = first_error(&records) {
            return Err(Error::Shm(format!(
                "rank {rank}: shared buffer #{idx}: rank {r} failed: {e}"
            )));
        }

        // Map every other local rank's segments.
        let opened = (|| -> Result<Opened> {
            let mut o = Opened {
                ctl: (0..n).map(|_| None).collect(),
                buf: (0..n).map(|_| None).collect(),
            };
            if !share {
                return Ok(o);
            }
            for (l, &peer) in node.iter().enumerate() {
                if l == me {
                    continue;
                }
                let rec = &records[peer];
                let what = format!("rank {rank}: shared buffer #{idx} of rank {peer}");
                if need_ctl {
                    let (h, ino) = rec.ctl.as_ref().ok_or_else(|| {
                        Error::Shm(format!("{what}: rank {peer} sent no control page"))
                    })?;
                    let m = open_checked(h, *ino, rec, ctl_bytes(n), true, &what)?;
                    control::check_page(&m, peer)
                        .map_err(|e| Error::Shm(format!("{what}: its control page: {e}")))?;
                    o.ctl[l] = Some(m);
                }
                let (h, ino) = rec
                    .buf
                    .as_ref()
                    .ok_or_else(|| Error::Shm(format!("{what}: rank {peer} sent no buffer")))?;
                o.buf[l] = Some(open_checked(h, *ino, rec, bytes, false, &what)?);
            }
            Ok(o)
        })();
        let second = match &opened {
            Ok(_) => Record::default(),
            Err(e) => Record {
                error: Some(e.to_string()),
                retry_named: !named && matches!(e, Error::Shm(s) if s.contains(RETRY_MARK)),
                ..Record::default()
            },
        };
        let statuses = self.exchange(&second);
        // Everyone has mapped what it could (or given up): drop the ways in, so nothing
        // outlives the mappings.
        if let Some(c) = made.ctl.as_mut() {
            c.release();
        }
        made.buf.release();
        let statuses = statuses?;
        if let Some((r, e)) = first_error(&statuses) {
            if statuses.iter().all(|s| s.error.is_none() || s.retry_named) {
                tracing::debug!(rank, "shared buffer #{idx}: rank {r}: {e}");
                return Ok(None);
            }
            return Err(Error::Shm(format!(
                "rank {rank}: shared buffer #{idx}: rank {r} could not map its peers' segments: {e}"
            )));
        }
        let mut opened = opened?;

        let ctl = made.ctl.map(|c| {
            let mut pages = Vec::with_capacity(n);
            let mut own = Some(c.into_mapping());
            for (l, m) in opened.ctl.iter_mut().enumerate() {
                if l == me {
                    pages.extend(own.take());
                } else {
                    pages.extend(m.take());
                }
            }
            // Every peer is known to be alive here: it has just taken part in the
            // exchange.
            NodeCtl::new(me, node.clone(), pages)
        });
        if let Some(c) = &ctl {
            if c.n() != n {
                return Err(Error::Shm(format!(
                    "rank {rank}: mapped {} of {n} control pages",
                    c.n()
                )));
            }
        }
        let mut maps = opened.buf;
        maps[me] = Some(made.buf.into_mapping());
        Ok(Some((ctl, Allocation { idx, maps })))
    }

    /// All-gathers one fixed-size record per rank over the communicator itself.
    fn exchange(&self, rec: &Record) -> Result<Vec<Record>> {
        let mut rec = rec.clone();
        if let Some(e) = &mut rec.error {
            if e.len() > RECORD_BYTES / 2 {
                let mut cut = RECORD_BYTES / 2;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.truncate(cut);
            }
        }
        let mut blob = serde_json::to_vec(&rec)
            .map_err(|e| Error::Shm(format!("encoding a shared-buffer record: {e}")))?;
        if blob.len() > RECORD_BYTES {
            return Err(Error::Shm(format!(
                "shared-buffer record of {} bytes exceeds {RECORD_BYTES}",
                blob.len()
            )));
        }
        blob.resize(RECORD_BYTES, b' ');
        let mut all = vec![0u8; RECORD_BYTES * self.world_size];
        self.all_gather(&blob, &mut all)?;
        all.chunks(RECORD_BYTES)
            .enumerate()
            .map(|(r, b)| parse_record(r, b))
            .collect()
    }
}

/// Reads rank `r`'s record of an allocation exchange (at most [`RECORD_BYTES`] from a
/// peer: JSON padded with spaces).
fn parse_record(r: usize, b: &[u8]) -> Result<Record> {
    if b.len() > RECORD_BYTES {
        return Err(Error::Shm(format!(
            "rank {r} sent a shared-buffer record of {} bytes, more than {RECORD_BYTES}",
            b.len()
        )));
    }
    serde_json::from_slice::<Record>(b).map_err(|e| {
        Error::Shm(format!(
            "rank {r} sent an unreadable shared-buffer record: {e}"
        ))
    })
}

/// Marks open failures that named segments may avoid.
const RETRY_MARK: &str = "(memfd not reachable)";

fn first_error(recs: &[Record]) -> Option<(usize, &str)> {
    recs.iter()
        .enumerate()
        .find_map(|(r, x)| x.error.as_deref().map(|e| (r, e)))
}

/// Opens a peer's segment and checks it is the one the peer made.
fn open_checked(
    h: &SegmentHandle,
    ino: u64,
    rec: &Record,
    min_bytes: usize,
    writable: bool,
    what: &str,
) -> Result<Mapping> {
    let memfd = matches!(h, SegmentHandle::Memfd { .. });
    if memfd && rec.pidns != own_pidns() {
        return Err(Error::Shm(format!(
            "{what}: the peer lives in another pid namespace {RETRY_MARK}"
        )));
    }
    // `what` names the owner already.
    let m = segment::open(h, None, min_bytes, writable, what).map_err(|e| match e {
        Error::Shm(s) if memfd => Error::Shm(format!("{s} {RETRY_MARK}")),
        other => other,
    })?;
    if m.inode() != ino {
        return Err(Error::Shm(format!(
            "{what}: the segment opened is not the one the peer made {RETRY_MARK}"
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::communicator::shared::testing::{secs, world};
    use crate::communicator::testing::on_all;
    use crate::transport::alloc_meter::allocated_by;
    use proptest::prelude::*;

    fn valid_record() -> Vec<u8> {
        let rec = Record {
            pid: 4242,
            pidns: 4026531836,
            ctl: Some((SegmentHandle::Memfd { pid: 4242, fd: 17 }, 99)),
            buf: Some((
                SegmentHandle::Named {
                    name: "hetccl-4242-buf-0-1-0123456789abcdef".into(),
                },
                100,
            )),
            error: Some("rank 1: something failed".into()),
            retry_named: true,
        };
        let mut b = serde_json::to_vec(&rec).unwrap();
        b.resize(RECORD_BYTES, b' ');
        b
    }

    proptest! {
        /// Records come from the peers: random bytes, or a valid record with bytes
        /// changed, parse or fail naming the rank, without a panic and allocating no
        /// more than a few times the record's size.
        #[test]
        fn any_record_parses_or_names_the_rank(
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..RECORD_BYTES + 100),
                prop::collection::vec((0usize..RECORD_BYTES, any::<u8>()), 1..6).prop_map(|flips| {
                    let mut b = valid_record();
                    for (at, v) in flips {
                        b[at] = v;
                    }
                    b
                }),
            ]
        ) {
            let (r, allocated) = allocated_by(|| parse_record(3, &bytes));
            prop_assert!(allocated <= 8 * RECORD_BYTES, "{} bytes", allocated);
            match r {
                // Longer records are refused before any parsing.
                Ok(_) => prop_assert!(bytes.len() <= RECORD_BYTES),
                Err(e) => {
                    let e = e.to_string();
                    prop_assert!(e.starts_with("shared memory: rank 3 sent "), "{}", e);
                }
            }
        }
    }

    #[test]
    fn a_valid_record_parses() {
        let rec = parse_record(0, &valid_record()).unwrap();
        assert_eq!((rec.pid, rec.retry_named), (4242, true));
        let e = parse_record(5, &[b'x'; RECORD_BYTES + 1])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "shared memory: rank 5 sent a shared-buffer record of 1025 bytes, more than 1024"
        );
    }

    #[test]
    fn buffers_outlive_the_communicator_and_len_zero_works() {
        let comms = world(2, secs(20));
        let bufs = on_all(&comms, |c| {
            let z = c.alloc_shared::<u64>(0).unwrap();
            assert!(z.is_empty());
            let mut b = c.alloc_shared::<u64>(10).unwrap();
            assert!(b.is_shared());
            assert_eq!(b.index(), 1);
            assert_eq!(&b[..], &[0u64; 10]);
            b[9] = 5;
            b
        });
        drop(comms);
        assert_eq!(bufs[1][9], 5);
        assert_eq!(bufs[0].index(), 1);
    }
}
