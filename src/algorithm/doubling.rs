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
//! group's, in that order (the upper one reduces into its scratch copy of the incoming
//! value, then copies it back), so both hold the same bits, and by induction every rank
//! ends with bitwise the same result. The whole message crosses every round, and the
//! incoming copy needs scratch the size of the message: the chooser only takes this for
//! messages up to [`MAX_BYTES`], where rounds cost more than bytes.

use super::schedule::{BufId, Builder, Combine, Region};
use super::Group;

/// Largest message recursive doubling is used for (its scratch is one message).
pub const MAX_BYTES: usize = 64 << 10;

/// Rounds of recursive doubling over `n` members (including the fold-in and fold-out).
pub fn rounds(n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    p.trailing_zeros() as usize + if p == n { 0 } else { 2 }
}

/// In-place all-reduce of `buf` over `g`.
pub fn all_reduce_inplace(b: &mut Builder, g: &Group, buf: Region) {
    let n = g.size();
    if n < 2 {
        return;
    }
    let me = g.me;
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let extra = n - p;
    let abs = |m: usize| g.members[m];
    // Virtual rank v (0..p) is played by member 2v when v < extra, else v + extra.
    let member = |v: usize| if v < extra { 2 * v } else { v + extra };
    let tmp = Region::new(BufId::Scratch, 0..buf.len);
    b.scratch(buf.len);

    // Fold in: each odd member below 2·extra hands its value to its even neighbour.
    let virt = if me < 2 * extra {
        if me % 2 == 1 {
            b.send(abs(me - 1), buf);
            None
        } else {
            b.recv(abs(me + 1), tmp, Combine::Copy);
            b.reduce(tmp, buf);
            Some(me / 2)
        }
    } else {
        Some(me - extra)
    };

    if let Some(v) = virt {
        let mut mask = 1;
        while mask < p {
            let partner = abs(member(v ^ mask));
            b.send(partner, buf);
            b.recv(partner, tmp, Combine::Copy);
            if v & mask == 0 {
                // Lower: mine (op) theirs.
                b.reduce(tmp, buf);
            } else {
                // Upper: theirs (op) mine, then back into place.
                b.reduce(buf, tmp);
                b.copy(tmp, buf);
            }
            mask <<= 1;
        }
    }

    // Fold out: the even neighbour returns the result.
    if me < 2 * extra {
        if me % 2 == 1 {
            b.recv(abs(me - 1), buf, Combine::Copy);
        } else {
            b.send(abs(me + 1), buf);
        }
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
}
