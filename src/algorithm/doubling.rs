//! Recursive doubling, for latency-bound all-reduces: `⌊log2 n⌋` rounds in which every
//! rank swaps its whole partial result with the rank whose position differs in one
//! bit, plus one round before and one after when `n` is not a power of two.
//!
//! ```text
//! n = 6, p = 4, extra = 2       fold in        doubling over p        fold out
//!   members 0 1 | 2 3 | 4 5     1 -> 0, 3 -> 2  {0,2,4,5} as 0..3       0 -> 1, 2 -> 3
//! ```
//!
//! In every round both partners combine the lower group's value with the upper
//! group's, in that order (the upper one forms `theirs (op) mine` in scratch as the
//! bytes arrive, then copies it back), so both hold the same bits, and by induction every rank
//! ends with bitwise the same result. The whole message crosses every round, and the
//! incoming copy needs scratch the size of the message: the selection only takes this
//! for messages up to [`super::select::DOUBLING_MAX_BYTES`], where rounds cost more than
//! bytes.

use super::schedule::{BufId, Builder, Combine, Region};
use super::Group;

/// How `n` members map onto the largest power of two `p ≤ n` for recursive doubling
/// and halving: the first `2·extra` members pair up (odd hands its buffer to even and
/// sits out), and virtual rank `v` of `0..p` is played by member [`Fold::member`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fold {
    /// Power of two taking part in the swaps.
    pub p: usize,
    /// Members folded into a neighbour: `n - p`.
    pub extra: usize,
}

impl Fold {
    /// The fold of `n ≥ 1` members.
    pub fn of(n: usize) -> Fold {
        let p = 1usize << (usize::BITS - 1 - n.max(1).leading_zeros());
        Fold { p, extra: n - p }
    }

    /// The member playing virtual rank `v`.
    pub fn member(&self, v: usize) -> usize {
        if v < self.extra {
            2 * v
        } else {
            v + self.extra
        }
    }

    /// Member `me`'s virtual rank, `None` for a member folded into its even neighbour.
    pub fn virt(&self, me: usize) -> Option<usize> {
        if me < 2 * self.extra {
            (me % 2 == 0).then_some(me / 2)
        } else {
            Some(me - self.extra)
        }
    }

    /// `log2 p`, plus the fold-in and fold-out steps when members were folded.
    pub fn steps(&self) -> usize {
        self.p.trailing_zeros() as usize + if self.extra == 0 { 0 } else { 2 }
    }
}

/// Rounds of recursive doubling over `n` members (including the fold-in and fold-out).
pub fn rounds(n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    Fold::of(n).steps()
}

/// In-place all-reduce of `buf` over `g`.
pub fn all_reduce_inplace(b: &mut Builder, g: &Group, buf: Region) {
    let n = g.size();
    if n < 2 {
        return;
    }
    let me = g.me;
    let fold = Fold::of(n);
    let folded = me < 2 * fold.extra;
    let abs = |m: usize| g.members[m];
    let tmp = Region::new(BufId::Scratch, 0..buf.len);
    b.scratch(buf.len);

    // Fold in: each odd member below 2·extra hands its value to its even neighbour.
    let virt = fold.virt(me);
    if folded {
        if virt.is_none() {
            b.send(abs(me - 1), buf);
        } else {
            b.recv(abs(me + 1), tmp, Combine::Copy);
            b.reduce(tmp, buf);
        }
    }

    if let Some(v) = virt {
        let mut mask = 1;
        while mask < fold.p {
            swap(b, abs(fold.member(v ^ mask)), v & mask == 0, buf, tmp);
            mask <<= 1;
        }
    }

    // Fold out: the even neighbour returns the result.
    if folded {
        if virt.is_none() {
            b.recv(abs(me - 1), buf, Combine::Copy);
        } else {
            b.send(abs(me + 1), buf);
        }
    }
}

/// Whether [`all_reduce_into`] takes `n` members: a power of two above one (no member
/// folds into another, whose first step would send the input it holds).
pub fn reads_input(n: usize) -> bool {
    n >= 2 && n.is_power_of_two()
}

/// Out-of-place all-reduce of `src` into `dst` over a group of [`reads_input`] size.
/// The first round reads `src` where it is, instead of a copy of it in `dst`: the send
/// takes `src`, and the receive forms the first partial result in `dst` in one pass
/// over the incoming bytes: `src (op) theirs` on the lower member, `theirs (op) src` on
/// the upper one ([`Combine::FromAfter`]), so both hold the same bits as in place. The
/// later rounds are those of [`all_reduce_inplace`] on `dst`. What this saves: writing
/// the whole message into `dst` before the first send, and the upper member's round
/// trip through scratch.
pub fn all_reduce_into(b: &mut Builder, g: &Group, src: Region, dst: Region) {
    let n = g.size();
    debug_assert!(reads_input(n), "doubling out of place over {n} members");
    let me = g.me;
    let tmp = Region::new(BufId::Scratch, 0..dst.len);
    let mut mask = 1;
    while mask < n {
        let partner = g.members[me ^ mask];
        let lower = me & mask == 0;
        if mask == 1 {
            b.send(partner, src);
            let first = if lower {
                Combine::From(src)
            } else {
                Combine::FromAfter(src)
            };
            b.recv(partner, dst, first);
        } else {
            b.scratch(dst.len);
            swap(b, partner, lower, dst, tmp);
        }
        mask <<= 1;
    }
}

/// One round in place: `buf` swapped with `partner` through `tmp`, the lower member's
/// value on the left of the operator on both sides. Neither receive writes `buf`, which
/// the round's send may still be reading, so the send and the receive run at once.
fn swap(b: &mut Builder, partner: usize, lower: bool, buf: Region, tmp: Region) {
    b.send(partner, buf);
    if lower {
        // Lower: mine (op) theirs.
        b.recv(partner, tmp, Combine::Copy);
        b.reduce(tmp, buf);
    } else {
        // Upper: theirs (op) mine, formed as the bytes arrive, then into place.
        b.recv(partner, tmp, Combine::FromAfter(buf));
        b.copy(tmp, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_log2_plus_two_off_powers_of_two() {
        let got: Vec<usize> = (1..=9).map(rounds).collect();
        assert_eq!(got, [0, 1, 3, 2, 4, 4, 4, 3, 5]);
    }

    #[test]
    fn an_in_place_round_costs_each_member_two_passes_and_never_waits_on_its_send() {
        use crate::algorithm::schedule::{BufId, OpKind};
        let buf = Region::new(BufId::Output, 0..4096);
        let tmp = Region::new(BufId::Scratch, 0..4096);
        // The lower member reduces theirs into its value; the upper one forms theirs (op)
        // mine as the bytes arrive and copies it back once its send is done.
        let lower = [
            OpKind::Recv {
                peer: 9,
                dst: tmp,
                combine: Combine::Copy,
            },
            OpKind::Reduce { src: tmp, dst: buf },
        ];
        let upper = [
            OpKind::Recv {
                peer: 7,
                dst: tmp,
                combine: Combine::FromAfter(buf),
            },
            OpKind::Copy { src: tmp, dst: buf },
        ];
        for (me, partner, want) in [(0, 9, lower), (1, 7, upper)] {
            let mut b = Builder::new("doubling");
            all_reduce_inplace(
                &mut b,
                &Group {
                    members: &[7, 9],
                    me,
                },
                buf,
            );
            let ops = b.build().ops;
            let kinds: Vec<OpKind> = ops.iter().map(|o| o.kind).collect();
            assert_eq!(
                kinds[0],
                OpKind::Send {
                    peer: partner,
                    src: buf
                }
            );
            assert_eq!(kinds[1..], want, "member {me}");
            assert!(
                ops[1].deps.is_empty(),
                "the receive waits on {:?}",
                ops[1].deps
            );
            assert_eq!(ops[2].deps, [0, 1]);
        }
    }

    #[test]
    fn six_members_fold_two_pairs_onto_four() {
        let f = Fold::of(6);
        assert_eq!(f, Fold { p: 4, extra: 2 });
        let virt: Vec<Option<usize>> = (0..6).map(|m| f.virt(m)).collect();
        assert_eq!(virt, [Some(0), None, Some(1), None, Some(2), Some(3)]);
        let members: Vec<usize> = (0..4).map(|v| f.member(v)).collect();
        assert_eq!(members, [0, 2, 4, 5]);
    }
}
