//! 16-bit values on the wire: which links compress, and the staging of a compressing
//! send. A send's f32 payload is compressed once, on the send's first poll, into a
//! buffer of its link, which the link then drains over as many polls as it needs. The
//! receiving side decompresses as pieces land (`recv.rs`).

use crate::compression::{self, OverflowStats, WireFormat};

/// Links whose f32 payloads travel as 16-bit wire values (compression). Only for f32
/// sums and averages: received values are decompressed and added in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Wire {
    /// The 16-bit format.
    pub format: WireFormat,
    /// Indexed by peer: true where messages are compressed.
    pub peers: Vec<bool>,
}

impl Wire {
    fn format_for(wire: Option<&Wire>, peer: usize) -> Option<WireFormat> {
        wire.filter(|w| w.peers.get(peer).copied().unwrap_or(false))
            .map(|w| w.format)
    }
}

/// The compressing links of one run and their staging buffers: one per link (one
/// message in flight per link), sized by the largest message: chunk-bounded, never the
/// whole buffer.
pub(super) struct Staging<'w> {
    wire: Option<&'w Wire>,
    /// Per link: the send staged in its buffer, and the buffer.
    bufs: Vec<(Option<usize>, Vec<u8>)>,
    /// What the compressing sends had to saturate.
    pub(super) stats: OverflowStats,
}

impl<'w> Staging<'w> {
    pub(super) fn new(wire: Option<&'w Wire>, links: usize) -> Self {
        // Only a run with a wire setting stages (`format` is `None` without one): the
        // others, most of them, allocate nothing here.
        let bufs = match wire {
            Some(_) => (0..links).map(|_| (None, Vec::new())).collect(),
            None => Vec::new(),
        };
        Staging {
            wire,
            bufs,
            stats: OverflowStats::default(),
        }
    }

    /// The wire format of link `peer`'s messages (`None`: uncompressed).
    #[inline]
    pub(super) fn format(&self, peer: usize) -> Option<WireFormat> {
        Wire::format_for(self.wire, peer)
    }

    /// The wire bytes of send `i` on link `peer` of payload `data` in `format`: staged
    /// on its first poll, the same bytes on every poll after it.
    pub(super) fn stage(
        &mut self,
        peer: usize,
        i: usize,
        format: WireFormat,
        data: &[u8],
    ) -> &[u8] {
        let (staged_op, buf) = &mut self.bufs[peer];
        if *staged_op != Some(i) {
            buf.resize(data.len() / 2, 0);
            let vals: std::borrow::Cow<[f32]> = match bytemuck::try_cast_slice(data) {
                Ok(v) => std::borrow::Cow::Borrowed(v),
                Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(data)),
            };
            self.stats += compression::compress_bytes(format, &vals, 1.0, None, buf);
            *staged_op = Some(i);
        }
        buf
    }
}
