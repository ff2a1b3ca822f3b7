//! Recursive halving then doubling (Rabenseifner's all-reduce), for medium sizes where
//! the ring's `2(n-1)` steps cost more than its bandwidth saves.
//!
//! Reduce-scatter by recursive halving: in round `k` each rank swaps half of the part
//! it still reduces with the rank `p/2^(k+1)` positions away, keeps the half on its side
//! and reduces the incoming copy of it; after `log2 p` rounds each rank holds one
//! `1/p` part fully reduced. All-gather by recursive doubling replays the rounds
//! backwards, copying instead of reducing. The bytes are the ring's, `2(p-1)/p` of the
//! message, in `2·log2 p` steps instead of `2(p-1)`.
//!
//! When `n` is not a power of two, the first `2·extra` members pair up first (odd hands
//! its buffer to even) and get the result back at the end, as in [`super::doubling`].
//! Every part is reduced by exactly one rank and copied to the others, so all ranks
//! hold the same bits. Transfers are cut into pipeline chunks, and no scratch is used;
//! out of place, the first round reads the input directly (no copy up front).

use std::ops::Range;

use super::doubling::Fold;
use super::schedule::{at, split_chunks, Builder, Combine, Region};
use super::Group;

/// Steps of the all-reduce over `n` members (fold-in and fold-out included).
pub fn steps(n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let f = Fold::of(n);
    2 * f.p.trailing_zeros() as usize + if f.extra == 0 { 0 } else { 2 }
}

/// All-reduce of `src` into `dst` (`count` elements of `elem` bytes each) over `g`;
/// `src` may be `dst` (in place). Out of place, the first reduction reads the input and
/// writes the output, so nothing is copied up front.
pub fn all_reduce_into(
    b: &mut Builder,
    g: &Group,
    src: Region,
    dst: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
) {
    let n = g.size();
    if n < 2 {
        return;
    }
    let me = g.me;
    let fold = Fold::of(n);
    let folded = me < 2 * fold.extra;
    let abs = |m: usize| g.members[m];
    // Element range `r` of `buf`, cut into pipeline chunks.
    let pieces = |buf: Region, r: &Range<usize>| -> Vec<Region> {
        let base = r.start * elem;
        split_chunks(r.len(), elem, chunk_bytes)
            .into_iter()
            .map(|c| at(buf, &(base + c.start..base + c.end)))
            .collect()
    };
    let send = |b: &mut Builder, peer: usize, from: Region, r: &Range<usize>| {
        for piece in pieces(from, r) {
            b.send(peer, piece);
        }
    };
    // Receives part `r` into `dst`: reduced with `cur`'s copy of it (accumulated where
    // that is `dst` itself), or copied.
    let recv = |b: &mut Builder, peer: usize, cur: Option<Region>, r: &Range<usize>| {
        let from = cur.map(|c| pieces(c, r));
        for (k, piece) in pieces(dst, r).into_iter().enumerate() {
            let combine = from.as_ref().map_or(Combine::Copy, |f| Combine::From(f[k]));
            b.recv(peer, piece, combine);
        }
    };
    let all = 0..count;
    // Where this rank's running value lives: the input until the first reduction.
    let mut cur = src;

    let virt = fold.virt(me);
    if folded {
        if virt.is_none() {
            send(b, abs(me - 1), cur, &all);
        } else {
            recv(b, abs(me + 1), Some(cur), &all);
            cur = dst;
        }
    }

    if let Some(v) = virt {
        // (partner, part kept, part given away) per round.
        let mut rounds = Vec::new();
        let mut part = all.clone();
        let mut d = fold.p / 2;
        while d >= 1 {
            let partner = abs(fold.member(v ^ d));
            let mid = part.start + part.len() / 2;
            let (keep, give) = if v & d == 0 {
                (part.start..mid, mid..part.end)
            } else {
                (mid..part.end, part.start..mid)
            };
            send(b, partner, cur, &give);
            recv(b, partner, Some(cur), &keep);
            cur = dst;
            rounds.push((partner, keep.clone(), give));
            part = keep;
            d /= 2;
        }
        for (partner, keep, give) in rounds.into_iter().rev() {
            send(b, partner, dst, &keep);
            recv(b, partner, None, &give);
        }
    }

    if folded {
        if virt.is_none() {
            recv(b, abs(me - 1), None, &all);
        } else {
            send(b, abs(me + 1), dst, &all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_twice_log2_plus_two_off_powers_of_two() {
        let got: Vec<usize> = (1..=9).map(steps).collect();
        assert_eq!(got, [0, 2, 4, 4, 6, 6, 6, 6, 8]);
    }
}
