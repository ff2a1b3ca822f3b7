//! The header every message of a collective carries, and the check that the peer sending
//! it runs the same call as this rank (collective, sequence number, element type and
//! count, reduction, wire format, message size).

use super::context::ExecCtx;
use super::recv::Sink;
use crate::compression::WireFormat;
use crate::dtype::{CollectiveOp, DataType, ReduceOp};
use crate::error::Result;
use crate::transport::{MsgHeader, MSG_MAGIC};

/// Header flags value for a wire format (0 = uncompressed).
fn wire_flags(w: Option<WireFormat>) -> u8 {
    w.map_or(0, |f| 1 + f as u8)
}

impl ExecCtx {
    /// The header of a message of `bytes` bytes on the wire (`wire`: its 16-bit format,
    /// if compressed).
    pub(super) fn header(&self, bytes: usize, wire: Option<WireFormat>) -> MsgHeader {
        MsgHeader {
            magic: MSG_MAGIC,
            op: self.op as u8,
            dtype: self.dtype as u8,
            redop: self.redop as u8,
            flags: wire_flags(wire),
            seq: self.seq,
            count: self.count,
            bytes: bytes as u64,
        }
    }
}

impl Sink<'_> {
    /// [`crate::transport::RecvSink::header`]: accepts exactly the header this rank
    /// expects for the receive, else names the peer and what differs.
    pub(super) fn check_header(&mut self, h: &MsgHeader) -> Result<()> {
        let wire_len = if self.wire.is_some() {
            self.len / 2
        } else {
            self.len
        };
        let want = self.ctx.header(wire_len, self.wire);
        if *h == want {
            return Ok(());
        }
        let describe = |h: &MsgHeader| {
            format!(
                "{} #{} of {} x {} ({} op, {} bytes in this message)",
                CollectiveOp::from_u8(h.op).map_or("unknown op", |o| o.name()),
                h.seq,
                h.count,
                DataType::from_u8(h.dtype).map_or("unknown dtype", |d| d.name()),
                ReduceOp::from_u8(h.redop).map_or("?", |o| o.name()),
                h.bytes
            )
        };
        let detail = if h.magic != MSG_MAGIC {
            format!("received a corrupt header (magic {:#x})", h.magic)
        } else if h.flags != want.flags {
            let name = |f: u8| match f {
                0 => "uncompressed",
                1 => "fp16",
                2 => "bf16",
                _ => "unknown",
            };
            format!(
                "expected {} payload, received {} (compression settings differ between ranks)",
                name(want.flags),
                name(h.flags)
            )
        } else {
            format!("expected {}, received {}", describe(&want), describe(h))
        };
        Err(self.ctx.mismatch(self.peer, detail))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::ctx;
    use super::*;
    use crate::algorithm::schedule::Combine;
    use crate::error::Error;
    use crate::transport::RecvSink;

    proptest::proptest! {
        /// A received header, valid or changed in up to three bytes (or all random), is
        /// accepted only when it is exactly the one this rank expects; otherwise the
        /// error names the peer, the collective and what differs. No panic, and only a
        /// small message's worth of allocation.
        #[test]
        fn a_header_is_accepted_only_when_it_is_the_one_expected(
            wire in proptest::option::of(proptest::prelude::Just(WireFormat::F16)),
            flips in proptest::collection::vec((0usize..32, 1u8..=255), 0..4),
            random in proptest::option::weighted(0.1, proptest::prelude::any::<[u8; 32]>()),
        ) {
            let c = ExecCtx {
                op: CollectiveOp::AllReduce,
                dtype: DataType::F32,
                count: 1000,
                seq: 9,
                ..ctx(1)
            };
            let mut dst = vec![0u8; 4000];
            let mut sink = Sink {
                ctx: &c,
                peer: 2,
                dst: dst.as_mut_ptr(),
                len: dst.len(),
                from: None,
                combine: Combine::Copy,
                wire,
                forward: &[],
                forwarded: 0,
                got: 0,
                stream_result: false,
            };
            let want = c.header(if wire.is_some() { 2000 } else { 4000 }, wire);
            let mut bytes = random.unwrap_or_else(|| {
                bytemuck::bytes_of(&want).try_into().unwrap()
            });
            for (at, x) in flips {
                bytes[at] ^= x;
            }
            let h: MsgHeader = bytemuck::pod_read_unaligned(&bytes);
            let (r, allocated) =
                crate::transport::alloc_meter::allocated_by(|| sink.header(&h));
            proptest::prop_assert!(allocated < 4096, "{} bytes", allocated);
            match r {
                Ok(()) => proptest::prop_assert_eq!(h, want),
                Err(Error::Mismatch { rank: 1, peer: 2, op: CollectiveOp::AllReduce, seq: 9, detail }) => {
                    proptest::prop_assert_ne!(h, want);
                    proptest::prop_assert!(
                        detail.starts_with("received a corrupt header (magic ")
                            || detail.ends_with("(compression settings differ between ranks)")
                            || detail.starts_with(
                                "expected all_reduce #9 of 1000 x f32 (sum op, "
                            ),
                        "{}", detail
                    );
                }
                Err(e) => proptest::prop_assert!(false, "{}", e),
            }
        }
    }
}
