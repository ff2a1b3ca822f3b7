//! What one device collective moves over each link class, per rank, on the IPC and the
//! flat staged paths ([`device_link_bytes`]), and the IPC path's window and shape
//! arithmetic that decides it. Pure: no CUDA type, so it is tested without a GPU, and
//! [`DeviceComm::link_bytes`](super::DeviceComm::link_bytes) reports exactly these
//! numbers. (The hierarchical all-reduce's are its plan's,
//! [`DeviceHierPlan::link_bytes`](crate::algorithm::device_hier::DeviceHierPlan::link_bytes).)
//!
//! Per rank `r` of `n`, `B` bytes the call's `count` elements, `n > 1`:
//!
//! ```text
//!                   IPC: read from peers' scratch      staged: device->host   host->device
//! all_reduce        one shot: (n-1) B                        B                     B
//!                   two shots, per window of W bytes:
//!                   (n-1) seg_r + (W - seg_r)
//! broadcast         root 0, others B                         root B, others 0      root 0, others B
//! all_gather        (n-1) B    (B: the send block)           B                     n B
//! reduce_scatter    (n-1) B    (B: the recv block)           n B                   B
//! reduce            root (n-1) B, others 0                   B                     root B, others 0
//! ```
//!
//! `seg_r` is rank `r`'s segment of the window ([`segment`]): in two shots a rank reads
//! its own segment from every peer to reduce it, then every other segment from its
//! owner. Copies between a rank's own buffers (into its own scratch, its own block) cross
//! no link and are not counted; neither are the host links' bytes of the staged path,
//! which the host communicator counts in their own classes. A one-rank call moves
//! nothing.

use crate::algorithm::device_hier::LinkBytes;
use crate::algorithm::select::{self, Path};
use crate::algorithm::Call;
use crate::dtype::CollectiveOp;

/// Which way a device collective moves its data, with what decides an IPC all-reduce's
/// windows and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRoute {
    /// CUDA IPC between the ranks of one host.
    Ipc {
        /// `HETCCL_DEVICE_SCRATCH_BYTES`: the largest window.
        scratch_bytes: usize,
        /// `HETCCL_DEVICE_ONE_SHOT_BYTES`.
        one_shot_bytes: Option<usize>,
        /// Every rank runs on one GPU (then every all-reduce runs in one shot).
        shared_gpu: bool,
    },
    /// Piece by piece through pinned host memory and the host communicator, flat.
    Staged,
}

/// Element range `(lo, len)` of segment `q` when `count` elements are split among `n`
/// ranks. Segments start at multiples of 8 elements so the reduction kernels can use
/// their 16-byte vector path on every segment; trailing segments may be short or empty.
pub(super) fn segment(count: usize, n: usize, q: usize) -> (usize, usize) {
    let per = count.div_ceil(n.max(1)).div_ceil(8) * 8;
    let lo = (q * per).min(count);
    (lo, per.min(count - lo))
}

/// `(offset, length)` of the consecutive windows of at most `window` elements that
/// cover `count` elements.
pub(super) fn windows(count: usize, window: usize) -> impl Iterator<Item = (usize, usize)> {
    let window = window.max(1);
    (0..count)
        .step_by(window)
        .map(move |off| (off, window.min(count - off)))
}

/// Elements of `elem` bytes that pass through an IPC scratch of `scratch_bytes` at
/// once: a multiple of `multiple`, at least one multiple.
pub fn ipc_window(scratch_bytes: usize, elem: usize, multiple: usize) -> usize {
    let multiple = multiple.max(1);
    let elems = scratch_bytes / elem.max(1);
    (elems / multiple * multiple).max(multiple)
}

/// Whether an IPC all-reduce window of `window_bytes` runs in one shot, as
/// [`select::device_all_reduce`] decides.
pub fn ipc_one_shot(window_bytes: usize, shared_gpu: bool, one_shot_bytes: Option<usize>) -> bool {
    matches!(
        select::device_all_reduce(window_bytes, shared_gpu, one_shot_bytes),
        Path::DeviceOneShot { .. }
    )
}

/// Bytes rank `rank` of `n` moves over each link class in `call` on `route`
/// (`network_sent` stays 0: the host links are the host communicator's to count).
/// `call.count` is what [`Call`] says it is per collective: the buffer's elements, the
/// send block of an all-gather, the recv block of a reduce-scatter.
pub fn device_link_bytes(call: &Call, n: usize, rank: usize, route: DeviceRoute) -> LinkBytes {
    let elem = call.dtype.size();
    let bytes = call.count * elem;
    let is_root = rank == call.root;
    let mut b = LinkBytes::default();
    if n <= 1 {
        return b;
    }
    let peers = n - 1;
    match route {
        DeviceRoute::Ipc {
            scratch_bytes,
            one_shot_bytes,
            shared_gpu,
        } => {
            b.ipc_read = match call.op {
                CollectiveOp::AllReduce => {
                    let window = ipc_window(scratch_bytes, elem, 8 * n).min(call.count);
                    if ipc_one_shot(window * elem, shared_gpu, one_shot_bytes) {
                        peers * bytes
                    } else {
                        windows(call.count, window)
                            .map(|(_, len)| {
                                let (_, seg) = segment(len, n, rank);
                                (peers * seg + (len - seg)) * elem
                            })
                            .sum()
                    }
                }
                CollectiveOp::Broadcast if is_root => 0,
                CollectiveOp::Broadcast => bytes,
                CollectiveOp::AllGather | CollectiveOp::ReduceScatter => peers * bytes,
                CollectiveOp::Reduce if is_root => peers * bytes,
                _ => 0,
            };
        }
        DeviceRoute::Staged => {
            let (to_host, to_device) = match call.op {
                CollectiveOp::AllReduce => (bytes, bytes),
                CollectiveOp::Broadcast if is_root => (bytes, 0),
                CollectiveOp::Broadcast => (0, bytes),
                CollectiveOp::AllGather => (bytes, n * bytes),
                CollectiveOp::ReduceScatter => (n * bytes, bytes),
                CollectiveOp::Reduce if is_root => (bytes, bytes),
                CollectiveOp::Reduce => (bytes, 0),
                _ => (0, 0),
            };
            b.device_to_host = to_host;
            b.host_to_device = to_device;
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DataType;
    use CollectiveOp::{AllGather, AllReduce, Broadcast, Reduce, ReduceScatter};

    /// 1000 f32 (4000 bytes) for `op` with root 1.
    fn call(op: CollectiveOp) -> Call {
        Call::new(op, DataType::F32, 1000).with_root(1)
    }

    const IPC: DeviceRoute = DeviceRoute::Ipc {
        scratch_bytes: 64 << 20,
        one_shot_bytes: None,
        shared_gpu: false,
    };

    fn ipc(read: usize) -> LinkBytes {
        LinkBytes {
            ipc_read: read,
            ..LinkBytes::default()
        }
    }

    fn staged(to_host: usize, to_device: usize) -> LinkBytes {
        LinkBytes {
            device_to_host: to_host,
            host_to_device: to_device,
            ..LinkBytes::default()
        }
    }

    #[test]
    fn staged_copies_per_collective_rank_and_world() {
        // (op, world, rank, device->host, host->device); the root is rank 1.
        let cases = [
            (AllReduce, 2, 0, 4000, 4000),
            (AllReduce, 3, 1, 4000, 4000),
            (AllReduce, 4, 3, 4000, 4000),
            (Broadcast, 2, 1, 4000, 0),
            (Broadcast, 2, 0, 0, 4000),
            (Broadcast, 3, 1, 4000, 0),
            (Broadcast, 3, 2, 0, 4000),
            (Broadcast, 4, 1, 4000, 0),
            (Broadcast, 4, 0, 0, 4000),
            (AllGather, 2, 0, 4000, 8000),
            (AllGather, 3, 1, 4000, 12000),
            (AllGather, 4, 3, 4000, 16000),
            (ReduceScatter, 2, 1, 8000, 4000),
            (ReduceScatter, 3, 0, 12000, 4000),
            (ReduceScatter, 4, 2, 16000, 4000),
            (Reduce, 2, 1, 4000, 4000),
            (Reduce, 2, 0, 4000, 0),
            (Reduce, 3, 1, 4000, 4000),
            (Reduce, 3, 2, 4000, 0),
            (Reduce, 4, 1, 4000, 4000),
            (Reduce, 4, 3, 4000, 0),
        ];
        for (op, n, rank, to_host, to_device) in cases {
            assert_eq!(
                device_link_bytes(&call(op), n, rank, DeviceRoute::Staged),
                staged(to_host, to_device),
                "{op:?} on {n} ranks, rank {rank}"
            );
        }
    }

    #[test]
    fn ipc_reads_per_collective_rank_and_world() {
        // (op, world, rank, bytes read from peers); the root is rank 1. 4000 bytes are
        // below the one-shot bound, so the all-reduce reads every peer's whole buffer.
        let cases = [
            (AllReduce, 2, 0, 4000),
            (AllReduce, 3, 1, 8000),
            (AllReduce, 4, 3, 12000),
            (Broadcast, 2, 1, 0),
            (Broadcast, 2, 0, 4000),
            (Broadcast, 3, 1, 0),
            (Broadcast, 3, 2, 4000),
            (Broadcast, 4, 1, 0),
            (Broadcast, 4, 3, 4000),
            (AllGather, 2, 1, 4000),
            (AllGather, 3, 0, 8000),
            (AllGather, 4, 2, 12000),
            (ReduceScatter, 2, 0, 4000),
            (ReduceScatter, 3, 2, 8000),
            (ReduceScatter, 4, 1, 12000),
            (Reduce, 2, 1, 4000),
            (Reduce, 2, 0, 0),
            (Reduce, 3, 1, 8000),
            (Reduce, 3, 0, 0),
            (Reduce, 4, 1, 12000),
            (Reduce, 4, 2, 0),
        ];
        for (op, n, rank, read) in cases {
            assert_eq!(
                device_link_bytes(&call(op), n, rank, IPC),
                ipc(read),
                "{op:?} on {n} ranks, rank {rank}"
            );
        }
    }

    #[test]
    fn a_two_shot_all_reduce_reads_its_segment_from_every_peer_and_the_rest_once() {
        // HETCCL_DEVICE_ONE_SHOT_BYTES=1024 < 4000: two shots in one window. Segments
        // of 1000: 2 ranks 504 + 496; 3 ranks 336 + 336 + 328; 4 ranks 3 x 256 + 232.
        let route = DeviceRoute::Ipc {
            scratch_bytes: 64 << 20,
            one_shot_bytes: Some(1024),
            shared_gpu: false,
        };
        let read = |n, rank| device_link_bytes(&call(AllReduce), n, rank, route).ipc_read;
        // (n - 1) x own segment + everything else once.
        assert_eq!(read(2, 0), (504 + 496) * 4);
        assert_eq!(read(2, 1), (496 + 504) * 4);
        assert_eq!(read(3, 0), (2 * 336 + 664) * 4);
        assert_eq!(read(3, 1), 5344);
        assert_eq!(read(3, 2), (2 * 328 + 672) * 4);
        assert_eq!(read(4, 0), (3 * 256 + 744) * 4);
        assert_eq!(read(4, 2), 6048);
        assert_eq!(read(4, 3), (3 * 232 + 768) * 4);
    }

    #[test]
    fn a_windowed_two_shot_all_reduce_counts_each_windows_segments() {
        // 100 f32 on 4 ranks through 128 bytes of scratch: windows of 32, 32, 32 and 4
        // elements; segments of 8 each, then 4 for rank 0 and none for the others. In
        // one window of 100 rank 3's segment would be 4 and rank 0's 32.
        let route = DeviceRoute::Ipc {
            scratch_bytes: 128,
            one_shot_bytes: Some(0),
            shared_gpu: false,
        };
        let c = Call::new(AllReduce, DataType::F32, 100);
        let read = |rank| device_link_bytes(&c, 4, rank, route).ipc_read;
        assert_eq!(read(0), (100 + 2 * (3 * 8 + 4)) * 4);
        assert_eq!(read(1), (100 + 2 * (3 * 8)) * 4);
        assert_eq!(read(3), 592);
    }

    #[test]
    fn ranks_on_one_gpu_take_one_shot_above_the_bound() {
        // 512 KiB, above the 256 KiB one-shot bound: two shots unless the GPU is shared.
        let c = Call::new(AllReduce, DataType::F32, 1 << 17);
        let route = |shared_gpu| DeviceRoute::Ipc {
            scratch_bytes: 64 << 20,
            one_shot_bytes: None,
            shared_gpu,
        };
        assert_eq!(device_link_bytes(&c, 4, 2, route(true)), ipc(3 << 19));
        // Segments of 2^15: 2^17 + 2 x 2^15 elements.
        assert_eq!(device_link_bytes(&c, 4, 2, route(false)), ipc(196_608 * 4));
    }

    #[test]
    fn bytes_scale_with_the_element_size() {
        let c = Call::new(AllGather, DataType::F16, 1000);
        assert_eq!(device_link_bytes(&c, 3, 0, IPC), ipc(4000));
        let c = Call::new(ReduceScatter, DataType::F64, 1000);
        assert_eq!(
            device_link_bytes(&c, 3, 0, DeviceRoute::Staged),
            staged(24_000, 8000)
        );
    }

    #[test]
    fn one_rank_moves_nothing() {
        for op in [AllReduce, Broadcast, AllGather, ReduceScatter, Reduce] {
            let c = Call::new(op, DataType::F32, 1000);
            for route in [IPC, DeviceRoute::Staged] {
                assert_eq!(
                    device_link_bytes(&c, 1, 0, route),
                    LinkBytes::default(),
                    "{op:?} {route:?}"
                );
            }
        }
    }

    #[test]
    fn ipc_windows_are_whole_multiples_of_at_least_one() {
        assert_eq!(ipc_window(64 << 20, 4, 32), 16 << 20);
        assert_eq!(ipc_window(100, 4, 8), 24);
        assert_eq!(ipc_window(128, 2, 32), 64);
        assert_eq!(ipc_window(4, 4, 8), 8);
    }

    #[test]
    fn segments_tile_the_buffer_on_vector_boundaries() {
        for count in [1usize, 7, 8, 1000, (1 << 20) + 3] {
            for n in 1..=8 {
                let mut next = 0;
                for q in 0..n {
                    let (lo, len) = segment(count, n, q);
                    assert_eq!(lo, next.min(count), "count {count} n {n} q {q}");
                    // Empty trailing segments sit at `count`, wherever that is.
                    assert!(lo % 8 == 0 || len == 0, "count {count} n {n} q {q}");
                    next = lo + len;
                }
                assert_eq!(next, count, "count {count} n {n}");
            }
        }
        assert_eq!(segment(1000, 4, 0), (0, 256));
        assert_eq!(segment(1000, 4, 3), (768, 232));
        assert_eq!(segment(1, 4, 0), (0, 1));
        assert_eq!(segment(1, 4, 1), (1, 0));
        assert_eq!(segment(1, 4, 3), (1, 0));
    }

    #[test]
    fn windows_cover_the_message_in_order() {
        let all = |count, window| windows(count, window).collect::<Vec<_>>();
        assert_eq!(all(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(all(8, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(all(3, 64), vec![(0, 3)]);
        assert_eq!(all(0, 4), vec![]);
    }
}
