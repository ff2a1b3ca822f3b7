//! In-process link pair for testing algorithms with one thread per rank.
//!
//! Each direction is a bounded queue of pieces (the header, then payload chunks of at
//! most `chunk_bytes`) behind a mutex. The bound makes a sender wait for its receiver
//! as a real transport would, so schedules that would deadlock on shm or TCP also
//! deadlock here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{AlignedBuf, Link, LinkKind, MsgHeader, RecvSink};
use crate::error::{AbortCause, Error, Result};

/// Payload bytes per queued piece in [`pair`].
pub const DEFAULT_CHUNK_BYTES: usize = 64 << 10;
/// Queued pieces per direction in [`pair`].
pub const DEFAULT_DEPTH: usize = 4;

enum Piece {
    Header(MsgHeader),
    Data(AlignedBuf),
}

#[derive(Default)]
struct Queue {
    pieces: VecDeque<Piece>,
    sender_gone: bool,
    receiver_gone: bool,
    /// The rank that aborted the link first, and why.
    aborted_by: Option<(usize, AbortCause)>,
}

/// One end of an in-process link; see [`pair`].
pub struct MemLink {
    rank: usize,
    peer: usize,
    tx: Arc<Mutex<Queue>>,
    rx: Arc<Mutex<Queue>>,
    chunk_bytes: usize,
    depth: usize,
    /// Payload bytes of the current outgoing message queued so far; `None` until its
    /// header is queued.
    send_off: Option<usize>,
    /// `(message bytes, bytes delivered)` of the current incoming message.
    recv: Option<(usize, usize)>,
}

/// Two connected ends: the first belongs to `rank_a` and talks to `rank_b`, the second
/// the other way round.
pub fn pair(rank_a: usize, rank_b: usize) -> (MemLink, MemLink) {
    pair_with(rank_a, rank_b, DEFAULT_CHUNK_BYTES, DEFAULT_DEPTH)
}

/// Like [`pair`] with `depth` queued pieces of `chunk_bytes` per direction
/// (`chunk_bytes` is rounded up to a multiple of 64, both are at least 1).
pub fn pair_with(
    rank_a: usize,
    rank_b: usize,
    chunk_bytes: usize,
    depth: usize,
) -> (MemLink, MemLink) {
    let ab = Arc::new(Mutex::new(Queue::default()));
    let ba = Arc::new(Mutex::new(Queue::default()));
    let chunk_bytes = chunk_bytes.max(1).next_multiple_of(64);
    let depth = depth.max(1);
    let end = |rank, peer, tx: &Arc<Mutex<Queue>>, rx: &Arc<Mutex<Queue>>| MemLink {
        rank,
        peer,
        tx: tx.clone(),
        rx: rx.clone(),
        chunk_bytes,
        depth,
        send_off: None,
        recv: None,
    };
    (end(rank_a, rank_b, &ab, &ba), end(rank_b, rank_a, &ba, &ab))
}

fn lock(q: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // A panic in another rank's thread must not hide this rank's own error.
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemLink {
    fn lost(&self, detail: String) -> Error {
        Error::Link {
            peer: self.peer,
            detail,
            lost: true,
        }
    }

    fn check_abort(&self, q: &Queue) -> Result<()> {
        match q.aborted_by {
            Some((r, _)) if r == self.rank => Err(Error::Link {
                peer: self.peer,
                detail: format!("rank {} aborted this link earlier", self.rank),
                lost: false,
            }),
            Some((r, _)) => Err(self.lost(format!("peer {r} aborted the link"))),
            None => Ok(()),
        }
    }
}

impl Link for MemLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn kind(&self) -> LinkKind {
        // Stands in for a same-host link in algorithm tests.
        LinkKind::Shm
    }

    fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool> {
        if header.bytes != data.len() as u64 {
            return Err(Error::invalid(
                "poll_send",
                format!(
                    "header says {} bytes, payload has {}",
                    header.bytes,
                    data.len()
                ),
            ));
        }
        let tx = self.tx.clone();
        let mut q = lock(&tx);
        self.check_abort(&q)?;
        if q.receiver_gone {
            return Err(self.lost(format!("peer {} closed the link", self.peer)));
        }
        while q.pieces.len() < self.depth {
            let Some(off) = self.send_off else {
                q.pieces.push_back(Piece::Header(*header));
                self.send_off = Some(0);
                continue;
            };
            if off == data.len() {
                break;
            }
            let n = (data.len() - off).min(self.chunk_bytes);
            let mut buf = AlignedBuf::zeroed(n);
            buf.as_mut_slice().copy_from_slice(&data[off..off + n]);
            q.pieces.push_back(Piece::Data(buf));
            self.send_off = Some(off + n);
        }
        if self.send_off == Some(data.len()) {
            self.send_off = None;
            return Ok(true);
        }
        Ok(false)
    }

    fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool> {
        loop {
            let piece = {
                let mut q = lock(&self.rx);
                self.check_abort(&q)?;
                match q.pieces.pop_front() {
                    Some(p) => p,
                    None if q.sender_gone => {
                        return Err(self.lost(format!("peer {} closed the link", self.peer)))
                    }
                    None => return Ok(false),
                }
            };
            // The lock is released: the sink may take its time.
            let (total, done) = match (piece, self.recv) {
                (Piece::Header(h), None) => {
                    sink.header(&h)?;
                    (h.bytes as usize, 0)
                }
                (Piece::Data(buf), Some((total, done))) => {
                    sink.data(done, buf.as_slice())?;
                    (total, done + buf.as_slice().len())
                }
                _ => {
                    return Err(Error::Link {
                        peer: self.peer,
                        detail: "in-process queue out of step".into(),
                        lost: false,
                    })
                }
            };
            if done == total {
                self.recv = None;
                return Ok(true);
            }
            self.recv = Some((total, done));
        }
    }

    fn check_peer(&mut self) -> Result<()> {
        let q = lock(&self.rx);
        self.check_abort(&q)?;
        if q.sender_gone && q.pieces.is_empty() {
            return Err(self.lost(format!("peer {} closed the link", self.peer)));
        }
        Ok(())
    }

    fn abort(&mut self, cause: AbortCause) {
        lock(&self.tx).aborted_by.get_or_insert((self.rank, cause));
        lock(&self.rx).aborted_by.get_or_insert((self.rank, cause));
    }

    fn abort_notice(&mut self) -> Option<AbortCause> {
        match lock(&self.rx).aborted_by {
            Some((r, cause)) if r == self.peer => Some(cause),
            _ => None,
        }
    }
}

impl Drop for MemLink {
    fn drop(&mut self) {
        lock(&self.tx).sender_gone = true;
        lock(&self.rx).receiver_gone = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::testing::*;

    #[test]
    fn messages_pass_both_ways_at_once() {
        let (mut a, mut b) = pair(0, 1);
        duplex(&mut a, &mut b, &STANDARD_SIZES);
        let (mut a, mut b) = pair_with(2, 3, 100, 1);
        assert_eq!((a.peer(), b.peer()), (3, 2));
        duplex(&mut a, &mut b, &STANDARD_SIZES[..5]);
    }

    #[test]
    fn pieces_follow_the_chunk_size() {
        let (mut a, mut b) = pair_with(0, 1, 64, 2);
        let msg = pattern(200, 1);
        let mut sink = VecSink::default();
        // Header + one chunk fit; the rest waits for the receiver.
        assert!(!a.poll_send(&header(0, 200), &msg).unwrap());
        assert!(!b.poll_recv(&mut sink).unwrap());
        assert!(!a.poll_send(&header(0, 200), &msg).unwrap());
        assert!(!b.poll_recv(&mut sink).unwrap());
        assert!(a.poll_send(&header(0, 200), &msg).unwrap());
        assert!(b.poll_recv(&mut sink).unwrap());
        assert_eq!(sink.data, msg);
        assert_eq!(sink.pieces, 4); // 64 + 64 + 64 + 8
    }

    #[test]
    fn drop_and_abort_reach_the_peer() {
        let (mut a, b) = pair(0, 1);
        drop(b);
        let e = a.poll_send(&header(0, 0), &[]).unwrap_err();
        assert_eq!(e.to_string(), "link to peer 1: peer 1 closed the link");
        let mut sink = VecSink::default();
        assert!(matches!(
            a.poll_recv(&mut sink),
            Err(Error::Link {
                peer: 1,
                lost: true,
                ..
            })
        ));

        let (mut a, mut b) = pair(0, 1);
        let cause = AbortCause::new(crate::error::AbortKind::TimedOut, 3);
        assert_eq!(a.abort_notice(), None);
        b.abort(cause);
        let e = a.check_peer().unwrap_err();
        assert_eq!(e.to_string(), "link to peer 1: peer 1 aborted the link");
        assert_eq!(a.abort_notice(), Some(cause));
        assert_eq!(b.abort_notice(), None, "its own abort is no notice");
        assert!(matches!(
            b.check_peer(),
            Err(Error::Link { lost: false, .. })
        ));
    }
}
