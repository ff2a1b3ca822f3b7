//! One collective call: what it is ([`Call`]), how a rank states it to its peers
//! ([`CallHeader`], one fixed-size encoding), and the one check that the ranks agree on
//! it ([`check`]).
//!
//! Every engine compares the call each peer states with its own before it uses any of
//! the peer's data, so a rank that runs another collective, count, dtype, reduction,
//! root, compression setting or sequence number than its peers gets
//! [`crate::Error::Mismatch`] naming the peer and both calls instead of corrupt data or a
//! hang:
//!
//! | engine | where the header travels | what travels beside it |
//! | --- | --- | --- |
//! | link executor ([`super::executor`]) | the header of every message (`transport::MsgHeader`): the link's magic in the version's place, the message's payload bytes in the root's | the payload bytes, compared too |
//! | shared memory (`communicator::shared`) | the call line of the rank's control page, and the header of each eager slot | where the rank's buffers lie |
//! | device collectives (`device::DeviceComm`) | an all-gather through the host communicator before each call | whether the rank refused its own call |
//!
//! The encoding is four words in native byte order (the ranks of a job run on one
//! architecture):
//!
//! ```text
//! word 0   version u32 | op u8 | dtype u8 | redop u8 | wire u8
//! word 1   seq       the communicator's sequence number of the call
//! word 2   count     elements, as the call counts them
//! word 3   root      root (broadcast, reduce) or peer (send/recv); NO_ROOT where not carried
//! ```
//!
//! `wire` is the format the sender's payload travels in (0: exact, 1: fp16, 2: bf16),
//! set on links that compress. What a rank decides alone (in place or not, which side of
//! a send/recv) is not stated: peers need not agree on it.
//!
//! Each engine keeps the words its users know from its errors (the [`Engine`] decides
//! them); which fields count and in what order they are compared is the same for all.

use crate::compression::WireFormat;
use crate::dtype::{CollectiveOp, DataType, ReduceOp};

/// One collective call as every rank states it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Call {
    /// Which collective.
    pub op: CollectiveOp,
    /// Element type.
    pub dtype: DataType,
    /// Reduction (ignored where none applies).
    pub redop: ReduceOp,
    /// Elements: of the buffer (all_reduce, broadcast, reduce, send/recv), of the
    /// output block (reduce_scatter), of the input block (all_gather).
    pub count: usize,
    /// Root rank (broadcast, reduce) or peer (send/recv).
    pub root: usize,
    /// Input and output are the same buffer.
    pub in_place: bool,
    /// For send/recv: true on the sending side.
    pub is_send: bool,
}

impl Call {
    /// `count` elements of `dtype` for `op`: a sum where a reduction applies, root 0,
    /// out of place.
    pub fn new(op: CollectiveOp, dtype: DataType, count: usize) -> Call {
        Call {
            op,
            dtype,
            redop: ReduceOp::Sum,
            count,
            root: 0,
            in_place: false,
            is_send: false,
        }
    }

    /// The same call with reduction `redop`.
    pub fn with_redop(self, redop: ReduceOp) -> Call {
        Call { redop, ..self }
    }

    /// The same call with root (or peer) `root`.
    pub fn with_root(self, root: usize) -> Call {
        Call { root, ..self }
    }

    /// Bytes of the buffer the call counts (one block for reduce_scatter and all_gather).
    pub fn bytes(&self) -> usize {
        self.count * self.dtype.size()
    }

    /// How this rank states the call numbered `seq`.
    pub fn header(&self, seq: u64) -> CallHeader {
        CallHeader::new(
            seq,
            self.op,
            self.dtype,
            self.redop,
            self.count as u64,
            self.root as u64,
        )
    }
}

/// Version of the encoding in [`CallHeader::version`]: changes whenever the layout of a
/// header, or of what an engine sends around it, changes ("HCC1").
pub const CALL_VERSION: u32 = u32::from_le_bytes(*b"HCC1");

/// [`CallHeader::root`] of a header that does not carry the root.
pub const NO_ROOT: u64 = u64::MAX;

/// A call as a rank states it to its peers: four words (see the module docs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CallHeader {
    /// [`CALL_VERSION`] (on a link, the link's message magic).
    pub version: u32,
    /// [`CollectiveOp`] tag.
    pub op: u8,
    /// [`DataType`] tag.
    pub dtype: u8,
    /// [`ReduceOp`] tag.
    pub redop: u8,
    /// Wire format of the payload ([`wire_tag`]).
    pub wire: u8,
    /// The communicator's sequence number of the call.
    pub seq: u64,
    /// Elements, as the call counts them.
    pub count: u64,
    /// Root or peer rank, or [`NO_ROOT`].
    pub root: u64,
}

/// Words of a [`CallHeader`].
pub const HEADER_WORDS: usize = 4;
const _: () = assert!(std::mem::size_of::<CallHeader>() == 8 * HEADER_WORDS);

impl CallHeader {
    /// The header of call `seq`, exact on the wire.
    pub fn new(
        seq: u64,
        op: CollectiveOp,
        dtype: DataType,
        redop: ReduceOp,
        count: u64,
        root: u64,
    ) -> CallHeader {
        CallHeader {
            version: CALL_VERSION,
            op: op as u8,
            dtype: dtype as u8,
            redop: redop as u8,
            wire: 0,
            seq,
            count,
            root,
        }
    }

    /// The header as words, for pages of atomics and all-gathers of `u64`.
    pub fn to_words(&self) -> [u64; HEADER_WORDS] {
        bytemuck::cast(*self)
    }

    /// A header from words a peer wrote; any words are a header, which [`check`] then
    /// judges.
    pub fn from_words(words: [u64; HEADER_WORDS]) -> CallHeader {
        bytemuck::cast(words)
    }

    fn op(&self) -> Option<CollectiveOp> {
        CollectiveOp::from_u8(self.op)
    }
}

/// [`CallHeader::wire`] for a payload in `format` (`None`: exact).
pub fn wire_tag(format: Option<WireFormat>) -> u8 {
    format.map_or(0, |f| 1 + f as u8)
}

/// Who checks, with what it knows beyond the two headers; it also words the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The link executor on a message header: the payload bytes it expects and those
    /// the header announces (compared too).
    Link {
        /// Bytes this rank expects in the message.
        bytes: u64,
        /// Bytes the received header announces.
        got: u64,
    },
    /// The direct algorithms on shared buffers, on a peer's call line.
    SharedBuffers,
    /// The eager path, on a peer's eager slot; `bytes` of this rank's all-reduce.
    Eager {
        /// Bytes of this rank's all-reduce.
        bytes: usize,
    },
    /// Device collectives, on a peer's all-gathered header; whether the peer refused
    /// its own call (a short buffer, a stream of another device).
    Device {
        /// The peer refused its call.
        refused: bool,
    },
}

/// Checks that `theirs`, the call peer `peer` states, is `mine`, the call rank `rank`
/// runs; otherwise says what differs, for [`crate::Error::Mismatch`]. In this order: the
/// encoding's version (on a link, the message magic), a device peer's refusal, the wire
/// format, then every other field (and on a link the payload bytes).
pub fn check(
    rank: usize,
    peer: usize,
    mine: &CallHeader,
    theirs: &CallHeader,
    engine: Engine,
) -> Result<(), String> {
    if theirs.version != mine.version {
        return Err(match engine {
            Engine::Link { .. } => {
                format!("received a corrupt header (magic {:#x})", theirs.version)
            }
            Engine::Device { .. } => format!(
                "peer runs another device protocol version ({:#x}, this rank {:#x})",
                theirs.version, mine.version
            ),
            Engine::SharedBuffers | Engine::Eager { .. } => format!(
                "peer {peer} publishes its calls in another encoding (version {:#x}, this \
                 rank {:#x})",
                theirs.version, mine.version
            ),
        });
    }
    if let Engine::Device { refused: true } = engine {
        return Err(format!(
            "peer {peer} refused its {} (its own error says why)",
            device_words(theirs)
        ));
    }
    if theirs.wire != mine.wire {
        // The inverse of `wire_tag`, for any byte a peer may have written.
        let name = |w: u8| match w {
            0 => "uncompressed",
            t => WireFormat::from_u8(t - 1).map_or("unknown", WireFormat::name),
        };
        return Err(format!(
            "expected {} payload, received {} (compression settings differ between ranks)",
            name(mine.wire),
            name(theirs.wire)
        ));
    }
    let same = theirs == mine;
    match engine {
        Engine::Link { bytes, got } if !same || bytes != got => Err(format!(
            "expected {}, received {}",
            link_words(mine, bytes),
            link_words(theirs, got)
        )),
        Engine::Eager { bytes } if !same && theirs.seq != mine.seq => Err(format!(
            "rank {rank} runs it as a small all_reduce ({bytes} bytes), peer {peer} as \
             something else (the ranks disagree on the count or the collective)"
        )),
        Engine::SharedBuffers | Engine::Eager { .. } if !same => Err(format!(
            "expected {}, peer runs {}",
            shared_words(mine),
            shared_words(theirs)
        )),
        Engine::Device { .. } if !same => Err(format!(
            "this rank called {}, peer {peer} called {}",
            device_words(mine),
            device_words(theirs)
        )),
        _ => Ok(()),
    }
}

/// What a shared-memory engine says when a peer ran call `seq` over links while this
/// rank waits for it on the control pages (the ranks chose different paths); `theirs`:
/// the call the peer stated there, when it could be read.
pub fn ran_over_links(
    rank: usize,
    peer: usize,
    eager: bool,
    theirs: Option<&CallHeader>,
) -> String {
    let runs = theirs.map_or(String::new(), |h| format!("runs {} ", shared_words(h)));
    if eager {
        format!(
            "rank {rank} runs it as a small all_reduce through shared memory, peer {peer} \
             {runs}over links (the ranks disagree on the count, the dtype or the collective)"
        )
    } else {
        format!(
            "rank {rank} runs it on shared buffers, peer {peer} {runs}over links (pass \
             buffers from alloc_shared on every rank, or on none)"
        )
    }
}

/// `all_reduce #9 of 1000 x f32 (sum op, 4000 bytes in this message)`.
fn link_words(h: &CallHeader, bytes: u64) -> String {
    format!(
        "{} #{} of {} x {} ({} op, {bytes} bytes in this message)",
        h.op().map_or("unknown op", |o| o.name()),
        h.seq,
        h.count,
        DataType::from_u8(h.dtype).map_or("unknown dtype", |d| d.name()),
        ReduceOp::from_u8(h.redop).map_or("?", |o| o.name()),
    )
}

/// `all_reduce #3 of 10 x f32 (sum op)`, `broadcast #3 of 10 x f32 from root 2`.
fn shared_words(h: &CallHeader) -> String {
    let op = h.op();
    let name = op.map_or("unknown op", |o| o.name());
    let dtype = DataType::from_u8(h.dtype).map_or("?", |d| d.name());
    let (seq, count) = (h.seq, h.count);
    match op {
        Some(CollectiveOp::Broadcast) if h.root != NO_ROOT => {
            format!("{name} #{seq} of {count} x {dtype} from root {}", h.root)
        }
        Some(CollectiveOp::Broadcast) => format!("{name} #{seq} of {count} x {dtype}"),
        Some(CollectiveOp::AllGather) => format!("{name} #{seq} of {count} x {dtype}"),
        _ => {
            let redop = ReduceOp::from_u8(h.redop).map_or("?", |o| o.name());
            format!("{name} #{seq} of {count} x {dtype} ({redop} op)")
        }
    }
}

/// `#2 all_reduce f32 x 1000 (sum)`, `#3 reduce f32 x 10 (max) root 1`: the reduction
/// where the collective has one, the root where it has one (both for an op this build
/// does not know).
fn device_words(h: &CallHeader) -> String {
    let op = h.op();
    let coll = op.map_or_else(|| format!("collective {}", h.op), |c| c.name().to_string());
    let dtype = DataType::from_u8(h.dtype)
        .map_or_else(|| format!("dtype {}", h.dtype), |d| d.name().to_string());
    let mut s = format!("#{} {coll} {dtype} x {}", h.seq, h.count);
    use CollectiveOp::*;
    if matches!(op, Some(AllReduce | ReduceScatter | Reduce) | None) {
        let redop = ReduceOp::from_u8(h.redop)
            .map_or_else(|| format!("op {}", h.redop), |o| o.name().to_string());
        s.push_str(&format!(" ({redop})"));
    }
    if matches!(op, Some(Broadcast | Reduce) | None) {
        s.push_str(&format!(" root {}", h.root));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_reduce(seq: u64, count: u64) -> CallHeader {
        CallHeader::new(
            seq,
            CollectiveOp::AllReduce,
            DataType::F32,
            ReduceOp::Sum,
            count,
            0,
        )
    }

    const ENGINES: [Engine; 5] = [
        Engine::Link {
            bytes: 4000,
            got: 4000,
        },
        Engine::SharedBuffers,
        Engine::Eager { bytes: 4000 },
        Engine::Device { refused: false },
        Engine::Device { refused: true },
    ];

    proptest! {
        /// Headers come from other processes: any words are judged without a panic, and
        /// a header passes exactly when it is the one this rank states (and, on a
        /// link, announces the bytes expected; a device peer must not have refused).
        #[test]
        fn any_header_passes_only_when_it_is_this_ranks(
            words in prop::array::uniform4(any::<u64>()),
            flips in prop::collection::vec((0usize..32, 1u8..=255), 0..3),
            got in prop_oneof![Just(4000u64), any::<u64>()],
        ) {
            let mine = all_reduce(9, 1000);
            let mut bytes = bytemuck::bytes_of(&mine).to_vec();
            for (at, x) in &flips {
                bytes[*at] ^= x;
            }
            let near: CallHeader = bytemuck::pod_read_unaligned(&bytes);
            for theirs in [CallHeader::from_words(words), near] {
                prop_assert_eq!(CallHeader::from_words(theirs.to_words()), theirs);
                for engine in ENGINES {
                    let engine = match engine {
                        Engine::Link { bytes, .. } => Engine::Link { bytes, got },
                        e => e,
                    };
                    let agree = theirs == mine
                        && match engine {
                            Engine::Link { bytes, got } => bytes == got,
                            Engine::Device { refused } => !refused,
                            Engine::SharedBuffers | Engine::Eager { .. } => true,
                        };
                    let r = check(1, 2, &mine, &theirs, engine);
                    prop_assert_eq!(r.is_ok(), agree, "{:?} {:?}: {:?}", engine, theirs, r);
                }
            }
        }
    }

    /// The words of every engine, as each has always worded its mismatches.
    #[test]
    fn each_engine_words_a_mismatch_as_before() {
        let link = |mine: &CallHeader, theirs: &CallHeader, bytes, got| {
            check(1, 2, mine, theirs, Engine::Link { bytes, got }).unwrap_err()
        };
        let mine = all_reduce(9, 1000);
        let with = |f: &dyn Fn(&mut CallHeader)| {
            let mut h = mine;
            f(&mut h);
            h
        };
        assert_eq!(
            link(&mine, &with(&|h| h.count = 1001), 4000, 4004),
            "expected all_reduce #9 of 1000 x f32 (sum op, 4000 bytes in this message), \
             received all_reduce #9 of 1001 x f32 (sum op, 4004 bytes in this message)"
        );
        assert_eq!(
            link(&mine, &mine, 4000, 12),
            "expected all_reduce #9 of 1000 x f32 (sum op, 4000 bytes in this message), \
             received all_reduce #9 of 1000 x f32 (sum op, 12 bytes in this message)"
        );
        assert_eq!(
            link(
                &mine,
                &with(&|h| (h.op, h.dtype, h.redop) = (200, 99, 77)),
                2000,
                2000
            ),
            "expected all_reduce #9 of 1000 x f32 (sum op, 2000 bytes in this message), \
             received unknown op #9 of 1000 x unknown dtype (? op, 2000 bytes in this message)"
        );
        assert_eq!(
            link(&mine, &with(&|h| h.version = 0x1234), 4000, 4000),
            "received a corrupt header (magic 0x1234)"
        );
        let fp16 = with(&|h| h.wire = wire_tag(Some(WireFormat::F16)));
        assert_eq!(
            link(&fp16, &mine, 2000, 4000),
            "expected fp16 payload, received uncompressed (compression settings differ \
             between ranks)"
        );
        assert_eq!(
            link(&mine, &with(&|h| h.wire = 7), 4000, 4000),
            "expected uncompressed payload, received unknown (compression settings differ \
             between ranks)"
        );
        assert_eq!(
            link(&fp16, &with(&|h| h.wire = 2), 2000, 2000),
            "expected fp16 payload, received bf16 (compression settings differ between ranks)"
        );

        let shared = |mine: &CallHeader, theirs: &CallHeader| {
            check(0, 1, mine, theirs, Engine::SharedBuffers).unwrap_err()
        };
        let bcast = |root| {
            CallHeader::new(
                3,
                CollectiveOp::Broadcast,
                DataType::F32,
                ReduceOp::Sum,
                10,
                root,
            )
        };
        assert_eq!(
            shared(&bcast(2), &bcast(1)),
            "expected broadcast #3 of 10 x f32 from root 2, peer runs broadcast #3 of 10 x \
             f32 from root 1"
        );
        let gather = CallHeader {
            op: CollectiveOp::AllGather as u8,
            ..bcast(0)
        };
        let odd = CallHeader {
            op: 0,
            dtype: 99,
            redop: 77,
            ..bcast(0)
        };
        assert_eq!(
            shared(&gather, &odd),
            "expected all_gather #3 of 10 x f32, peer runs unknown op #3 of 10 x ? (? op)"
        );
        let rs = CallHeader {
            op: CollectiveOp::ReduceScatter as u8,
            redop: ReduceOp::Avg as u8,
            ..bcast(0)
        };
        assert_eq!(
            shared(&rs, &with(&|h| h.seq = 3)),
            "expected reduce_scatter #3 of 10 x f32 (avg op), peer runs all_reduce #3 of 1000 \
             x f32 (sum op)"
        );
        assert_eq!(
            check(
                0,
                1,
                &mine,
                &with(&|h| h.seq = 10),
                Engine::Eager { bytes: 4000 }
            )
            .unwrap_err(),
            "rank 0 runs it as a small all_reduce (4000 bytes), peer 1 as something else (the \
             ranks disagree on the count or the collective)"
        );
        assert_eq!(
            check(
                0,
                1,
                &mine,
                &with(&|h| h.count = 20),
                Engine::Eager { bytes: 4000 }
            )
            .unwrap_err(),
            "expected all_reduce #9 of 1000 x f32 (sum op), peer runs all_reduce #9 of 20 x f32 \
             (sum op)"
        );

        let device = |mine: &CallHeader, theirs: &CallHeader, refused| {
            check(0, 1, mine, theirs, Engine::Device { refused }).unwrap_err()
        };
        let avg = CallHeader::new(
            3,
            CollectiveOp::AllReduce,
            DataType::F32,
            ReduceOp::Avg,
            10,
            0,
        );
        assert_eq!(
            device(&avg, &bcast(2), true),
            "peer 1 refused its #3 broadcast f32 x 10 root 2 (its own error says why)"
        );
        assert_eq!(
            device(&avg, &bcast(2), false),
            "this rank called #3 all_reduce f32 x 10 (avg), peer 1 called #3 broadcast f32 x \
             10 root 2"
        );
        let reduce = CallHeader {
            op: CollectiveOp::Reduce as u8,
            redop: ReduceOp::Max as u8,
            ..bcast(1)
        };
        let unknown = CallHeader {
            op: 99,
            dtype: 200,
            redop: 100,
            ..bcast(5)
        };
        assert_eq!(
            device(&reduce, &unknown, false),
            "this rank called #3 reduce f32 x 10 (max) root 1, peer 1 called #3 collective 99 \
             dtype 200 x 10 (op 100) root 5"
        );
        assert_eq!(
            device(&avg, &with(&|h| h.version = 5), false),
            format!("peer runs another device protocol version (0x5, this rank {CALL_VERSION:#x})")
        );
        assert_eq!(
            ran_over_links(0, 1, false, None),
            "rank 0 runs it on shared buffers, peer 1 over links (pass buffers from \
             alloc_shared on every rank, or on none)"
        );
        assert_eq!(
            ran_over_links(0, 1, true, Some(&avg)),
            "rank 0 runs it as a small all_reduce through shared memory, peer 1 runs \
             all_reduce #3 of 10 x f32 (avg op) over links (the ranks disagree on the count, \
             the dtype or the collective)"
        );
    }

    #[test]
    fn a_call_states_what_peers_must_agree_on() {
        let c = Call::new(CollectiveOp::Reduce, DataType::F64, 7)
            .with_redop(ReduceOp::Min)
            .with_root(3);
        let h = c.header(12);
        assert_eq!(
            (h.version, h.op, h.dtype, h.redop, h.wire, h.seq, h.count, h.root),
            (CALL_VERSION, 5, 8, 3, 0, 12, 7, 3)
        );
        // What a rank decides alone is not stated.
        let other = Call {
            in_place: true,
            is_send: true,
            ..c
        };
        assert_eq!(other.header(12), h);
        assert_eq!(c.bytes(), 56);
        assert_eq!(
            h.to_words()[1..],
            [12, 7, 3],
            "seq, count, root in words 1-3"
        );
        assert_eq!(CALL_VERSION.to_le_bytes(), *b"HCC1");
        assert_eq!(
            [
                wire_tag(None),
                wire_tag(Some(WireFormat::F16)),
                wire_tag(Some(WireFormat::Bf16))
            ],
            [0, 1, 2]
        );
    }
}
