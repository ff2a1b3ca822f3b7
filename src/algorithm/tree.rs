//! Binomial-tree algorithms for latency-bound sizes: `log2 n` rounds each way.
//!
//! All-reduce is a reduce up the tree to member 0 followed by a broadcast down it.
//! The result is computed once, at the root, and copied to everyone, so every rank
//! holds bitwise the same bytes. Large buffers are cut into chunks so the tree
//! pipelines (a parent forwards chunk `c` while chunk `c + 1` climbs).

use super::schedule::{at, split_chunks, Builder, Combine, Region};
use super::Group;

/// Parent and children (in receive order) of member `vr` in a binomial tree over `n`
/// members rooted at 0 (`vr` is the member's position relative to the root).
pub fn binomial(vr: usize, n: usize) -> (Option<usize>, Vec<usize>) {
    let mut children = Vec::new();
    let mut mask = 1;
    while mask < n {
        if vr & mask != 0 {
            return (Some(vr - mask), children);
        }
        if vr + mask < n {
            children.push(vr + mask);
        }
        mask <<= 1;
    }
    (None, children)
}

/// In-place reduce of `buf` to member `root`; other members' buffers end holding
/// partial results.
pub fn reduce_inplace(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    root: usize,
) {
    let n = g.size();
    let vr = (g.me + n - root) % n;
    let abs = |v: usize| g.members[(v + root) % n];
    let (parent, children) = binomial(vr, n);
    for c in split_chunks(count, elem, chunk_bytes) {
        for &ch in &children {
            b.recv(abs(ch), at(buf, &c), Combine::Accumulate);
        }
        if let Some(p) = parent {
            b.send(abs(p), at(buf, &c));
        }
    }
}

/// In-place broadcast of `buf` from member `root`.
pub fn broadcast_inplace(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
    root: usize,
) {
    let n = g.size();
    let vr = (g.me + n - root) % n;
    let abs = |v: usize| g.members[(v + root) % n];
    let (parent, children) = binomial(vr, n);
    for c in split_chunks(count, elem, chunk_bytes) {
        if let Some(p) = parent {
            b.recv(abs(p), at(buf, &c), Combine::Copy);
        }
        // Farthest subtree first: it has the most levels still to go.
        for &ch in children.iter().rev() {
            b.send(abs(ch), at(buf, &c));
        }
    }
}

/// In-place all-reduce: reduce to member 0, then broadcast.
pub fn all_reduce_inplace(
    b: &mut Builder,
    g: &Group,
    buf: Region,
    count: usize,
    elem: usize,
    chunk_bytes: usize,
) {
    reduce_inplace(b, g, buf, count, elem, chunk_bytes, 0);
    broadcast_inplace(b, g, buf, count, elem, chunk_bytes, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tree_shape() {
        assert_eq!(binomial(0, 8), (None, vec![1, 2, 4]));
        assert_eq!(binomial(4, 8), (Some(0), vec![5, 6]));
        assert_eq!(binomial(6, 8), (Some(4), vec![7]));
        assert_eq!(binomial(5, 6), (Some(4), vec![]));
        assert_eq!(binomial(2, 3), (Some(0), vec![]));
    }
}
