//! Uneven parts for a ring all-reduce among nodes whose links differ in speed.
//!
//! In a ring all-reduce over `N` members, member `i` finishes the reduction of a part
//! `s_i` of the buffer (`Σ s_i = S`). Each part travels `N - 1` hops in the
//! reduce-scatter (starting at its finisher's successor) and `N - 1` in the all-gather
//! (starting at its finisher), so the edge from member `i` to member `i + 1` carries
//!
//! ```text
//! 2S - s_i - s_(i+1)      (what i sends; what i+1 receives)
//! ```
//!
//! With edge bandwidths `e_i` the ring takes `T = max_i (2S - s_i - s_(i+1)) / e_i`.
//! Equal parts give `2(N-1)/N · S / min e`: the slowest edge sets the pace. The least
//! `T` over the parts is a linear programme,
//!
//! ```text
//! min T   s.t.   s_i + s_(i+1) + e_i T >= 2,   Σ s_i = 1,   s >= 0     (S = 1)
//! ```
//!
//! solved exactly here. Its dual is `max (2 Σy - max_j (y_(j-1) + y_j)) / Σ e_i y_i`
//! over `y >= 0`: a linear-fractional programme over the fractional stable-set polytope
//! of the ring's edges (edges sharing a node are adjacent), whose vertices are the sets
//! of pairwise non-adjacent edges and, for odd `N`, all halves. So
//!
//! ```text
//! T* = max( max_m (2m - 1) / W_m ,  [N odd] 2(N-1) / Σ e )
//! ```
//!
//! with `W_m` the least total bandwidth of `m` pairwise non-adjacent edges (a small
//! dynamic programme). Every member sends at least `S` (each element of its input or of
//! the result it finished must leave it once), which is the `m = 1` term. The parts
//! that reach `T*` come from the primal at that `T`: the least `Σ s` covering every
//! edge's demand `s_i + s_(i+1) >= 2 - T* e_i` is convex in `s_0`, and for a fixed
//! `s_0` the least cover of the rest of the ring is greedy (each `s_i` as small as its
//! left edge allows: raising one by `δ` saves at most `δ` further on).
//!
//! Example: nodes at 1, 1 and 0.25 Gbit/s. Edges 1, 0.25, 0.25; equal parts take
//! `(4/3) S / 0.25` = `5.33 S/Gbit`; the best parts are `(0, 0, 1)`: the slow node
//! finishes everything, sending and receiving `S` while the fast ones carry `2S` at four
//! times the speed, `T* = S / 0.25` = `4 S/Gbit`.

/// Uneven parts for the hierarchical all-reduce's inter-node rings: the order of the
/// nodes around every shard's ring and the fraction of the shard each ring position
/// finishes. The same on every rank (a pure function of the shared topology).
#[derive(Clone, Debug, PartialEq)]
pub struct RingParts {
    /// Node indices in ring order (a permutation of `0..N`).
    pub order: Vec<usize>,
    /// Fraction of each shard the node at each position of `order` finishes; sums to 1.
    pub parts: Vec<f64>,
    /// Predicted seconds per byte of the buffer of the inter-node phase with these
    /// parts (for the log and the simulator's checks).
    pub time: f64,
    /// The same with equal parts, the nodes in index order.
    pub equal_time: f64,
}

impl std::fmt::Display for RingParts {
    /// `node2 100.0% -> node0 0.0% -> ...`-style: each node of the ring in order with the
    /// share of every shard it finishes, then the predicted gain.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, p)) in self.order.iter().zip(&self.parts).enumerate() {
            let sep = if i == 0 { "" } else { " -> " };
            write!(f, "{sep}node {k} {:.1}%", p * 100.0)?;
        }
        write!(
            f,
            " (inter-node phase {:.3} s/GB, {:.3} s/GB with equal parts)",
            self.time * 1e9,
            self.equal_time * 1e9
        )
    }
}

/// How long a ring with edge bandwidths `e` (edge `i`: member `i` to `i + 1`) takes with
/// parts `s` (fractions of the buffer), in buffer sizes per unit of bandwidth.
pub fn ring_time(e: &[f64], s: &[f64]) -> f64 {
    let n = e.len();
    if n < 2 {
        return 0.0;
    }
    (0..n)
        .map(|i| (2.0 - s[i] - s[(i + 1) % n]).max(0.0) / e[i])
        .fold(0.0, f64::max)
}

/// Equal parts, `1/N` each.
pub fn equal(n: usize) -> Vec<f64> {
    vec![1.0 / n.max(1) as f64; n]
}

/// The least total of `m` pairwise non-adjacent entries of `e` on a path (no wrap),
/// for every `m` up to `mmax` (`f64::INFINITY` where `m` do not fit).
fn path_min_sums(e: &[f64], mmax: usize) -> Vec<f64> {
    // best[k][t]: least total of k entries chosen so far, t = whether the last was taken.
    let inf = f64::INFINITY;
    let mut best = vec![[inf, inf]; mmax + 1];
    best[0][0] = 0.0;
    for &x in e {
        let mut next = vec![[inf, inf]; mmax + 1];
        for k in 0..=mmax {
            let skip = best[k][0].min(best[k][1]);
            next[k][0] = next[k][0].min(skip);
            if k < mmax && best[k][0].is_finite() {
                next[k + 1][1] = next[k + 1][1].min(best[k][0] + x);
            }
        }
        best = next;
    }
    best.into_iter().map(|[a, b]| a.min(b)).collect()
}

/// The least ring time over all parts for edge bandwidths `e` (the closed form of the
/// module docs), in buffer sizes per unit of bandwidth.
pub fn best_time(e: &[f64]) -> f64 {
    let n = e.len();
    if n < 2 {
        return 0.0;
    }
    let mmax = n / 2;
    // W_m on the ring: edge 0 left out (a path over 1..n), or taken (its neighbours
    // 1 and n-1 left out: a path over 2..n-1 with one fewer).
    let without = path_min_sums(&e[1..], mmax);
    let with = if n >= 3 {
        path_min_sums(&e[2..n - 1], mmax)
    } else {
        path_min_sums(&[], mmax)
    };
    let mut t = 0.0f64;
    for m in 1..=mmax.max(1) {
        let w = without[m].min(e[0] + with[m - 1]);
        if w.is_finite() && w > 0.0 {
            t = t.max((2 * m - 1) as f64 / w);
        }
    }
    if n % 2 == 1 {
        t = t.max(2.0 * (n - 1) as f64 / e.iter().sum::<f64>());
    }
    t
}

/// The least `Σ s` with `s_0 = x` that meets every demand `s_i + s_(i+1) >= c_i`, and
/// those parts (greedy along the ring, the last one also meeting the wrap-around edge).
fn cover_from(c: &[f64], x: f64) -> (f64, Vec<f64>) {
    let n = c.len();
    let mut s = vec![0.0; n];
    s[0] = x;
    for i in 1..n {
        s[i] = (c[i - 1] - s[i - 1]).max(0.0);
    }
    s[n - 1] = s[n - 1].max(c[n - 1] - x);
    (s.iter().sum(), s)
}

/// The parts (fractions summing to 1, one per member) that make a ring with edge
/// bandwidths `e` take [`best_time`], and that time. Where several parts reach it, the
/// ones nearest equal parts along the line from a least cover to equal parts: the ring
/// time is convex along it, so the points that keep `T*` are an interval, found by
/// bisection. Fractions below `1e-9` are rounding and become 0.
pub fn solve(e: &[f64]) -> (f64, Vec<f64>) {
    let n = e.len();
    if n < 3 || e.iter().any(|x| !(*x > 0.0 && x.is_finite())) {
        return (ring_time(e, &equal(n)), equal(n));
    }
    let t = best_time(e);
    let c: Vec<f64> = e.iter().map(|ei| 2.0 - t * ei).collect();
    // The least cover is convex in s_0 over [0, 1]: ternary search to the last bit.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let a = lo + (hi - lo) / 3.0;
        let b = hi - (hi - lo) / 3.0;
        if cover_from(&c, a).0 <= cover_from(&c, b).0 {
            hi = b;
        } else {
            lo = a;
        }
    }
    let (sum, cover) = cover_from(&c, lo);
    // What the cover leaves over goes to all alike: more parts only unload edges.
    let spare = (1.0 - sum).max(0.0) / n as f64;
    let total: f64 = cover.iter().map(|x| x + spare).sum();
    let best: Vec<f64> = cover.iter().map(|x| (x + spare) / total).collect();
    let eq = equal(n);
    let blend = |l: f64| -> Vec<f64> {
        best.iter()
            .zip(&eq)
            .map(|(b, q)| l * b + (1.0 - l) * q)
            .collect()
    };
    let keeps = |l: f64| ring_time(e, &blend(l)) <= t * (1.0 + 1e-12);
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    if keeps(0.0) {
        hi = 0.0;
    }
    while hi - lo > 1e-15 {
        let mid = 0.5 * (lo + hi);
        if keeps(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let mut s = blend(hi);
    for x in &mut s {
        if *x < 1e-9 {
            *x = 0.0;
        }
    }
    let total: f64 = s.iter().sum();
    s.iter_mut().for_each(|x| *x /= total);
    (t, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
    }

    #[test]
    fn one_slow_node_of_three_finishes_everything() {
        // Nodes 1, 1, 0.25 (Gbit/s) in this order: edges A-B 1, B-C 0.25, C-A 0.25.
        let e = [1.0, 0.25, 0.25];
        close(ring_time(&e, &equal(3)), (4.0 / 3.0) / 0.25);
        close(best_time(&e), 4.0);
        let (t, s) = solve(&e);
        close(t, 4.0);
        for (got, want) in s.iter().zip([0.0, 0.0, 1.0]) {
            close(*got, want);
        }
        close(ring_time(&e, &s), 4.0);
    }

    #[test]
    fn equal_links_keep_equal_parts() {
        for n in 3..8 {
            let e = vec![2.0; n];
            let want = 2.0 * (n - 1) as f64 / n as f64 / 2.0;
            close(best_time(&e), want);
            let (t, s) = solve(&e);
            close(t, want);
            for x in s {
                close(x, 1.0 / n as f64);
            }
        }
    }

    #[test]
    fn hand_solved_rings() {
        // Nodes 1, 1, 1, 0.25: edges 1, 1, 0.25, 0.25. m = 1: 1/0.25 = 4; m = 2 (edges
        // 0 and 2, or 1 and 3): 3/1.25 = 2.4. T = 4 against equal parts' 1.5/0.25 = 6.
        let e = [1.0, 1.0, 0.25, 0.25];
        close(best_time(&e), 4.0);
        close(ring_time(&e, &equal(4)), 6.0);
        close(ring_time(&e, &solve(&e).1), 4.0);
        // One node at 0.5 between fast ones: edges 1, 0.5, 0.5. m = 1: 2; all halves:
        // 4/2 = 2. T = 2 against equal parts' (4/3)/0.5 = 2.67.
        close(best_time(&[1.0, 0.5, 0.5]), 2.0);
        let (t, s) = solve(&[1.0, 0.5, 0.5]);
        close(t, 2.0);
        close(ring_time(&[1.0, 0.5, 0.5], &s), 2.0);
        // Two slow nodes of four, side by side: edges 1, 0.25, 0.25, 0.25. m = 1: 4;
        // m = 2: 3 / (0.25 + 0.25) = 6. T = 6 against equal parts' 1.5/0.25 = 6: no gain.
        close(best_time(&[1.0, 0.25, 0.25, 0.25]), 6.0);
        // Five nodes, one at 0.25: edges 1, 1, 1, 0.25, 0.25. m = 1: 4; m = 2:
        // 3/(0.25 + 1) = 2.4; all halves: 8/3.5 = 2.29. T = 4.
        let e = [1.0, 1.0, 1.0, 0.25, 0.25];
        close(best_time(&e), 4.0);
        let (t, s) = solve(&e);
        close(t, 4.0);
        close(ring_time(&e, &s), 4.0);
        close(s.iter().sum(), 1.0);
    }

    #[test]
    fn solved_parts_reach_the_closed_form_and_beat_any_other() {
        // A few rings; the solved parts' time is the closed form, and no part vector on
        // a grid does better.
        for e in [
            vec![1.0, 0.3, 0.7],
            vec![0.2, 1.0, 0.6, 0.9],
            vec![1.0, 1.0, 0.1, 0.5, 0.8],
        ] {
            let (t, s) = solve(&e);
            close(ring_time(&e, &s), t);
            let n = e.len();
            let steps = 10;
            let mut idx = vec![0usize; n - 1];
            loop {
                let used: usize = idx.iter().sum();
                if used <= steps {
                    let mut p: Vec<f64> = idx.iter().map(|&k| k as f64 / steps as f64).collect();
                    p.push((steps - used) as f64 / steps as f64);
                    assert!(ring_time(&e, &p) >= t - 1e-9, "{e:?}: {p:?} beats {s:?}");
                }
                let mut k = 0;
                while k < n - 1 {
                    idx[k] += 1;
                    if idx[k] <= steps {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == n - 1 {
                    break;
                }
            }
        }
    }
}
