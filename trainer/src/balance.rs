//! Splitting a global batch over ranks of different speeds, and following the speeds as
//! they drift.
//!
//! [`split_batch`] turns speeds into whole-sample shares. [`Follower`] is the rule that
//! re-splits during a run: every rank feeds it the same all-gathered per-step speeds, so
//! every rank takes the same decisions at the same steps. It is a pure state machine
//! (no clocks, no I/O); the training loop measures and applies.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Splits `global` samples over ranks of `speeds` (samples/s) so that the slowest rank
/// finishes first: every rank gets one sample, then each further sample goes to the rank
/// that would finish it soonest, `(share + 1) / speed` (ties to the lower rank). This is
/// the whole-sample split with the least `max share / speed`; shares are proportional to
/// the speeds where whole samples allow.
///
/// Every rank computes this from the same all-gathered speeds, so all agree.
pub fn split_batch(global: usize, speeds: &[f64]) -> Result<Vec<usize>> {
    let n = speeds.len();
    if n == 0 || global < n {
        return Err(Error::invalid(
            "split_batch",
            format!("cannot give each of {n} ranks a sample out of {global}"),
        ));
    }
    if speeds.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(Error::invalid(
            "split_batch",
            format!("speeds must be positive: {speeds:?}"),
        ));
    }
    // Start below the optimum: each rank's floor of its proportional quota (at least 1)
    // finishes no later than `global / Σ speeds`, which no split beats. Filling up one
    // sample at a time from there keeps the greedy exact without `global × n` steps.
    let total: f64 = speeds.iter().sum();
    let mut share: Vec<usize> = speeds
        .iter()
        .map(|s| ((global as f64 * s / total).floor() as usize).max(1))
        .collect();
    if share.iter().sum::<usize>() > global {
        share = vec![1; n];
    }
    for _ in share.iter().sum::<usize>()..global {
        let mut best = 0;
        for r in 1..n {
            let (tb, tr) = (
                (share[best] + 1) as f64 / speeds[best],
                (share[r] + 1) as f64 / speeds[r],
            );
            if tr < tb {
                best = r;
            }
        }
        share[best] += 1;
    }
    Ok(share)
}

/// Equal split: the first `global mod n` ranks get one extra sample.
pub fn split_equal(global: usize, n: usize) -> Result<Vec<usize>> {
    split_batch(global, &vec![1.0; n])
}

/// The time a step takes with `split` at `speeds`: the slowest rank's share over its speed.
pub fn step_time(split: &[usize], speeds: &[f64]) -> f64 {
    split
        .iter()
        .zip(speeds)
        .map(|(&b, &s)| b as f64 / s)
        .fold(0.0, f64::max)
}

/// A split in force from `step` on (samples per micro-batch of every rank).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitChange {
    /// First step run with it.
    pub step: u64,
    /// Samples per micro-batch, by rank.
    pub micro: Vec<usize>,
}

/// The split in force at `step` among `changes` (in step order): the last one at or
/// before it.
pub fn split_at(changes: &[SplitChange], step: u64) -> Option<&[usize]> {
    changes
        .iter()
        .take_while(|c| c.step <= step)
        .last()
        .map(|c| c.micro.as_slice())
}

/// When the batch is split again: a quick rule for drifts and a fine one for the last
/// sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rebalance {
    /// Re-split only when the current split's step is predicted this much slower than the
    /// best split's (0.08: 8 %). The dead band keeps two splits one sample apart, whose
    /// times differ by less, from taking turns.
    pub threshold: f64,
    /// Steps at a split before it may change, and the steps whose per-rank median speed
    /// decides: the speeds measured at the old split say little about the new one (a
    /// smaller share runs less efficiently), and one step's noise in fewer than half of
    /// them never re-splits.
    pub dwell: usize,
    /// The fine rule: a split predicted this much slower than the best over the median of
    /// [`Rebalance::fine_window`] steps is changed too. One sample off at batch 64 over
    /// ranks of speeds 2 : 1 costs 2-3 % of every step, inside the quick rule's dead
    /// band, for the whole run; the long window's median is steady enough for a band
    /// that narrow.
    pub fine_threshold: f64,
    /// Steps at a split whose median the fine rule reads.
    pub fine_window: usize,
}

impl Default for Rebalance {
    fn default() -> Self {
        Rebalance {
            threshold: 0.08,
            dwell: 3,
            fine_threshold: 0.015,
            fine_window: 12,
        }
    }
}

/// Decides from the steps' measured speeds when to re-split (see [`Rebalance`]).
#[derive(Clone, Debug)]
pub struct Follower {
    rule: Rebalance,
    global: usize,
    /// Per-step speeds of every rank since the last re-split (at most the longer of the
    /// two windows), newest last.
    seen: VecDeque<Vec<f64>>,
}

/// The median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

impl Follower {
    /// A follower for splits of `global` samples.
    pub fn new(global: usize, rule: Rebalance) -> Follower {
        Follower {
            rule,
            global,
            seen: VecDeque::new(),
        }
    }

    /// Takes one step's speeds (samples/s of compute, by rank), measured at `split`, and
    /// returns the split for the next step when the shares are off by more than the
    /// threshold over the last `dwell` steps, or by more than the fine threshold over the
    /// last `fine_window`. Speeds that are not positive and finite (a rank with no
    /// measurable compute) are not counted.
    ///
    /// Speeds are not quite proportional to shares: a pass has costs that do not shrink
    /// with its share. That errs on the safe side: the rank that gives a sample away
    /// finishes a little later than predicted, the one that takes it a little earlier
    /// (at its measured speed it would also pay its fixed costs again). A move the
    /// speeds predict faster takes samples from the rank that sets the step's time and
    /// gives them to one that finishes earlier than predicted, so it is faster, if by
    /// less than predicted.
    pub fn observe(&mut self, split: &[usize], speeds: &[f64]) -> Option<Vec<usize>> {
        if speeds.len() != split.len() || speeds.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return None;
        }
        self.seen.push_back(speeds.to_vec());
        let dwell = self.rule.dwell.max(1);
        let fine = self.rule.fine_window.max(dwell);
        while self.seen.len() > fine {
            self.seen.pop_front();
        }
        if self.seen.len() < dwell {
            return None;
        }
        let (rule, global) = (self.rule, self.global);
        let seen: &[Vec<f64>] = self.seen.make_contiguous();
        let quick = resplit(global, split, &seen[seen.len() - dwell..], rule.threshold);
        let next = quick.or_else(|| {
            (seen.len() == fine)
                .then(|| resplit(global, split, seen, rule.fine_threshold))
                .flatten()
        })?;
        self.seen.clear();
        Some(next)
    }
}

/// The re-split rule on its own: the per-rank median of `seen` (one speed vector a step)
/// is the speed estimate; the best whole-sample split for it replaces `split` when
/// `split`'s predicted step time exceeds the best's by more than `threshold`.
pub fn resplit(
    global: usize,
    split: &[usize],
    seen: &[Vec<f64>],
    threshold: f64,
) -> Option<Vec<usize>> {
    let n = split.len();
    if seen.is_empty() || seen.iter().any(|s| s.len() != n) {
        return None;
    }
    let speeds: Vec<f64> = (0..n)
        .map(|r| median(seen.iter().map(|s| s[r]).collect()))
        .collect();
    let best = split_batch(global, &speeds).ok()?;
    if best == split {
        return None;
    }
    let (now, then) = (step_time(split, &speeds), step_time(&best, &speeds));
    (now > then * (1.0 + threshold)).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every split of `global` over n ranks with at least one each, for the brute force.
    fn all_splits(global: usize, n: usize) -> Vec<Vec<usize>> {
        if n == 1 {
            return vec![vec![global]];
        }
        (1..=global - (n - 1))
            .flat_map(|first| {
                all_splits(global - first, n - 1)
                    .into_iter()
                    .map(move |mut rest| {
                        rest.insert(0, first);
                        rest
                    })
            })
            .collect()
    }

    #[test]
    fn the_split_is_the_fastest_in_whole_samples() {
        let cases: &[&[f64]] = &[
            &[1.0, 0.5],
            &[1.857, 1.0],
            &[3.0, 1.0, 0.7],
            &[1.0, 1.0, 0.01],
            &[0.31, 0.29, 0.9, 0.5],
        ];
        for speeds in cases {
            for global in speeds.len()..=20 {
                let got = split_batch(global, speeds).unwrap();
                assert_eq!(got.iter().sum::<usize>(), global);
                let best = all_splits(global, speeds.len())
                    .iter()
                    .map(|s| step_time(s, speeds))
                    .fold(f64::MAX, f64::min);
                assert!(
                    step_time(&got, speeds) <= best * (1.0 + 1e-12),
                    "{speeds:?} {global}: {got:?} takes {}, best {best}",
                    step_time(&got, speeds)
                );
            }
        }
        // A rank at half speed, 16 samples: 11 + 5 (5.5 units) beats the 10 + 6 (6 units)
        // of rounding the quotas 10.67 and 5.33 to the nearest.
        assert_eq!(split_batch(16, &[1.0, 0.5]).unwrap(), [11, 5]);
        // Quotas 10.4 and 5.6: nearest rounding would give 10 + 6 (6.0), 11 + 5 takes 5.92.
        assert_eq!(split_batch(16, &[1.857, 1.0]).unwrap(), [11, 5]);
        assert_eq!(split_batch(64, &[1.0, 0.5]).unwrap(), [43, 21]);
    }

    #[test]
    fn split_at_finds_the_change_in_force() {
        let c = [
            SplitChange {
                step: 0,
                micro: vec![8, 8],
            },
            SplitChange {
                step: 5,
                micro: vec![11, 5],
            },
        ];
        assert_eq!(split_at(&c, 0), Some(&[8, 8][..]));
        assert_eq!(split_at(&c, 4), Some(&[8, 8][..]));
        assert_eq!(split_at(&c, 5), Some(&[11, 5][..]));
        assert_eq!(split_at(&c, 99), Some(&[11, 5][..]));
        assert_eq!(split_at(&c[1..], 4), None);
    }

    #[test]
    fn resplit_needs_more_than_the_threshold() {
        let seen = |s: &[f64]| vec![s.to_vec(); 3];
        // Rank 1 at half speed: 8 + 8 takes 8 units, 11 + 5 takes 5.5: 45 % off.
        assert_eq!(
            resplit(16, &[8, 8], &seen(&[2.0, 1.0]), 0.08),
            Some(vec![11, 5])
        );
        assert_eq!(resplit(16, &[8, 8], &seen(&[2.0, 1.0]), 0.5), None);
        // Already the best split: nothing to do, whatever the threshold.
        assert_eq!(resplit(16, &[11, 5], &seen(&[2.0, 1.0]), 0.0), None);
        // Speeds drift a little (rank 1 at 0.55 of rank 0): the best split is 10 + 6
        // (5.45 units against 5.5 for 11 + 5), under 1 % better: inside the dead band.
        assert_eq!(resplit(16, &[11, 5], &seen(&[2.0, 1.1]), 0.08), None);
        assert_eq!(
            resplit(16, &[11, 5], &seen(&[2.0, 1.1]), 0.0),
            Some(vec![10, 6])
        );
        // The median ignores one outlier step in three.
        let noisy = vec![vec![1.0, 1.0], vec![1.0, 0.1], vec![1.0, 1.0]];
        assert_eq!(resplit(16, &[8, 8], &noisy, 0.08), None);
        // Shapes that do not match the split decide nothing.
        assert_eq!(resplit(16, &[8, 8], &[vec![1.0]], 0.08), None);
        assert_eq!(resplit(16, &[8, 8], &[], 0.08), None);
    }

    #[test]
    fn the_follower_waits_its_dwell_and_follows_a_slowdown() {
        let rule = Rebalance {
            threshold: 0.08,
            dwell: 3,
            ..Rebalance::default()
        };
        let mut f = Follower::new(16, rule);
        let mut split = vec![8, 8];
        let mut changes = Vec::new();
        for step in 0..30u64 {
            // Rank 1 runs at half speed from step 10, with ±3 % jitter.
            let jitter = 1.0 + 0.03 * ((step * 7 % 5) as f64 - 2.0) / 2.0;
            let speeds = [
                100.0,
                if step >= 10 {
                    50.0 * jitter
                } else {
                    100.0 * jitter
                },
            ];
            if let Some(next) = f.observe(&split, &speeds) {
                changes.push((step, next.clone()));
                split = next;
            }
        }
        // One change, once two of the last three steps were slowed, and none back.
        assert_eq!(changes, [(11, vec![11, 5])]);
        // Speeds that are not measurable are not counted.
        let mut f = Follower::new(16, rule);
        for _ in 0..5 {
            assert_eq!(f.observe(&[8, 8], &[100.0, 0.0]), None);
            assert_eq!(f.observe(&[8, 8], &[100.0, f64::NAN]), None);
        }
        assert_eq!(f.observe(&[8, 8], &[100.0, 50.0]), None);
        assert_eq!(f.observe(&[8, 8], &[100.0, 50.0]), None);
        assert_eq!(f.observe(&[8, 8], &[100.0, 50.0]), Some(vec![11, 5]));
    }

    #[test]
    fn the_fine_rule_moves_the_last_sample_and_holds_still_in_noise() {
        let rule = Rebalance::default();
        // Batch 64, rank 1 at half speed, started one sample off: [44, 20] takes 0.44,
        // [43, 21] 0.43 units, 2.3 % apart: inside the quick rule's band, past the fine
        // rule's, which moves it once its window is full, and never again.
        let mut f = Follower::new(64, rule);
        let mut split = vec![44, 20];
        let mut changes = Vec::new();
        for step in 0..60u64 {
            let jitter = 1.0 + 0.04 * ((step * 7 % 5) as f64 - 2.0) / 2.0;
            if let Some(next) = f.observe(&split, &[100.0, 50.0 * jitter]) {
                changes.push((step, next.clone()));
                split = next;
            }
        }
        assert_eq!(changes, [(11, vec![43, 21])]);
        // Speeds 100 : 51.16 make [43, 21] and [42, 22] take the same 0.43 units: neither
        // moves to the other under ±4 % jitter.
        for start in [[43, 21], [42, 22]] {
            let mut f = Follower::new(64, rule);
            for step in 0..60u64 {
                let jitter = 1.0 + 0.04 * ((step * 3 % 5) as f64 - 2.0) / 2.0;
                assert_eq!(
                    f.observe(&start, &[100.0, 51.16 * jitter]),
                    None,
                    "{start:?}"
                );
            }
        }
    }

    #[test]
    fn proportional_where_whole_samples_allow() {
        assert_eq!(split_batch(16, &[1.0, 3.0]).unwrap(), [4, 12]);
        assert_eq!(split_batch(10, &[1.0, 1.0, 1.0]).unwrap(), [4, 3, 3]);
        // quotas 3.33, 6.67: the larger remainder gets the extra sample
        assert_eq!(split_batch(10, &[1.0, 2.0]).unwrap(), [3, 7]);
        assert_eq!(split_batch(32, &[100.0, 50.0, 50.0]).unwrap(), [16, 8, 8]);
    }

    #[test]
    fn every_rank_gets_at_least_one() {
        assert_eq!(split_batch(4, &[1.0, 1000.0]).unwrap(), [1, 3]);
        assert_eq!(split_batch(3, &[1e-9, 1e-9, 1.0]).unwrap(), [1, 1, 1]);
        let err = split_batch(2, &[1.0, 1.0, 1.0]).unwrap_err();
        assert!(
            err.to_string()
                .contains("each of 3 ranks a sample out of 2"),
            "{err}"
        );
        assert!(split_batch(4, &[1.0, 0.0]).is_err());
    }

    #[test]
    fn equal_split() {
        assert_eq!(split_equal(16, 2).unwrap(), [8, 8]);
        assert_eq!(split_equal(7, 3).unwrap(), [3, 2, 2]);
    }
}
