//! The header every message of a collective carries, and the check that the peer sending
//! it runs the same call as this rank (collective, sequence number, element type and
//! count, reduction, wire format, message size).

use super::context::ExecCtx;
use super::recv::Sink;
use crate::algorithm::call::{self, CallHeader};
use crate::compression::WireFormat;
use crate::error::Result;
use crate::transport::{MsgHeader, MSG_MAGIC};

impl ExecCtx {
    /// The header of a message of `bytes` payload in `wire` format: the call's encoding
    /// ([`call::CallHeader`]) with the link's magic for its version and the payload
    /// bytes for its root, which a message does not carry.
    pub(super) fn header(&self, bytes: usize, wire: Option<WireFormat>) -> MsgHeader {
        let c = CallHeader::new(
            self.seq,
            self.op,
            self.dtype,
            self.redop,
            self.count,
            call::NO_ROOT,
        );
        MsgHeader {
            magic: MSG_MAGIC,
            op: c.op,
            dtype: c.dtype,
            redop: c.redop,
            flags: call::wire_tag(wire),
            seq: c.seq,
            count: c.count,
            bytes: bytes as u64,
        }
    }
}

impl Sink<'_> {
    /// [`crate::transport::RecvSink::header`]: accepts exactly the header this rank
    /// expects for the receive, else names the peer and what differs
    /// ([`call::check`], the one agreement check of every engine).
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
        // The call each header carries, the magic in the version's place.
        let stated = |h: &MsgHeader| CallHeader {
            version: h.magic,
            op: h.op,
            dtype: h.dtype,
            redop: h.redop,
            wire: h.flags,
            seq: h.seq,
            count: h.count,
            root: call::NO_ROOT,
        };
        let engine = call::Engine::Link {
            bytes: want.bytes,
            got: h.bytes,
        };
        call::check(self.ctx.rank, self.peer, &stated(&want), &stated(h), engine)
            .map_err(|detail| self.ctx.mismatch(self.peer, detail))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::ctx;
    use super::*;
    use crate::algorithm::schedule::Combine;
    use crate::dtype::{CollectiveOp, DataType};
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
