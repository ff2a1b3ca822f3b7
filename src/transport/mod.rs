//! Point-to-point links. A [`Link`] moves framed messages between two ranks and knows
//! nothing of collectives: the algorithm layer decides what to send, the link only
//! how. Links are driven by polling, so one thread can keep a send to the right and a
//! receive from the left moving at the same time without deadlock and without a
//! thread per link.
//!
//! | link | when |
//! | --- | --- |
//! | [`shm`] | two ranks on one host (unless `HETCCL_SHM_DISABLE=1`) |
//! | [`tcp`] | ranks on different hosts; several sockets per peer, chunks striped |

use crate::error::Result;

/// First field of every message header.
pub const MSG_MAGIC: u32 = 0x4843_4d31; // "HCM1"

/// Precedes every message on every link. The executor fills it and checks what it
/// receives against what it expects, so a rank running a different collective, count or
/// dtype than its peer is caught on the first message instead of corrupting data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MsgHeader {
    /// [`MSG_MAGIC`].
    pub magic: u32,
    /// `CollectiveOp` tag.
    pub op: u8,
    /// `DataType` tag.
    pub dtype: u8,
    /// `ReduceOp` tag (0 where none applies).
    pub redop: u8,
    /// Reserved flags (wire compression).
    pub flags: u8,
    /// The communicator's collective sequence number.
    pub seq: u64,
    /// Element count the caller passed to the collective.
    pub count: u64,
    /// Payload bytes following this header.
    pub bytes: u64,
}

/// Size of [`MsgHeader`] on the wire.
pub const HEADER_BYTES: usize = std::mem::size_of::<MsgHeader>();

/// What kind of link connects two ranks (also used by the topology and cost model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum LinkKind {
    /// Shared-memory rings between processes on one host.
    Shm,
    /// TCP sockets.
    Tcp,
}

/// Receives an incoming message piece by piece.
pub trait RecvSink {
    /// Called once per message, before any payload; an error aborts the receive.
    fn header(&mut self, h: &MsgHeader) -> Result<()>;
    /// Called with the payload in order. `offset` is where `bytes` starts within the
    /// message. Pieces start at offsets that are multiples of 64 and every piece but
    /// the last of a message is a multiple of 64 bytes long, so no element is split.
    fn data(&mut self, offset: usize, bytes: &[u8]) -> Result<()>;
}

/// A bidirectional, ordered, reliable message link to one peer.
///
/// At most one message is in flight per direction: the caller repeats `poll_send`
/// with the same header and payload until it returns `Ok(true)` before starting the
/// next message (likewise for `poll_recv`). Errors are [`crate::Error::Link`]; the
/// executor adds the collective's context.
pub trait Link: Send {
    /// The rank at the other end.
    fn peer(&self) -> usize;
    /// Which transport this is.
    fn kind(&self) -> LinkKind;
    /// Moves the current outgoing message forward without blocking; `Ok(true)` once
    /// the whole message (header then `data`, `header.bytes == data.len()`) is handed off.
    fn poll_send(&mut self, header: &MsgHeader, data: &[u8]) -> Result<bool>;
    /// Moves the current incoming message forward without blocking; `Ok(true)` once
    /// the sink has seen the header and all payload.
    fn poll_recv(&mut self, sink: &mut dyn RecvSink) -> Result<bool>;
    /// Checks whether the peer is still there, for transports where a dead peer is
    /// silent (shared memory). Called by the executor while it waits.
    fn check_peer(&mut self) -> Result<()>;
    /// Tells the peer that this side gives up (after an error); later calls on both
    /// sides fail promptly instead of waiting for a timeout.
    fn abort(&mut self);
    /// File descriptors to sleep on in `poll(2)` while waiting for this link
    /// (`(fd, want_write)`); empty for links that can only be polled by spinning.
    fn wait_fds(&self, _out: &mut Vec<(i32, bool)>) {}
}
