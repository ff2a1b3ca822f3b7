//! Splitting a global batch over ranks of different speeds.

use crate::error::{Error, Result};

/// Splits `global` samples over ranks in proportion to `speeds` (samples/s), every rank
/// getting at least one: largest-remainder rounding (ties to the lower rank), then ranks
/// rounded down to 0 take one sample each from the largest share.
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
    let total: f64 = speeds.iter().sum();
    let quota: Vec<f64> = speeds.iter().map(|s| global as f64 * s / total).collect();
    let mut share: Vec<usize> = quota.iter().map(|q| q.floor() as usize).collect();
    let mut left = global - share.iter().sum::<usize>().min(global);
    let mut order: Vec<usize> = (0..n).collect();
    // Stable sort: equal remainders keep rank order.
    order.sort_by(|&a, &b| {
        let (ra, rb) = (quota[a] - quota[a].floor(), quota[b] - quota[b].floor());
        rb.total_cmp(&ra)
    });
    for &r in order.iter().cycle() {
        if left == 0 {
            break;
        }
        share[r] += 1;
        left -= 1;
    }
    for r in 0..n {
        if share[r] == 0 {
            let donor = (0..n)
                .filter(|&d| share[d] > 1)
                .max_by(|&a, &b| share[a].cmp(&share[b]).then(b.cmp(&a)))
                .ok_or_else(|| Error::invalid("split_batch", "no rank can spare a sample"))?;
            share[donor] -= 1;
            share[r] = 1;
        }
    }
    Ok(share)
}

/// Equal split: the first `global mod n` ranks get one extra sample.
pub fn split_equal(global: usize, n: usize) -> Result<Vec<usize>> {
    split_batch(global, &vec![1.0; n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_with_largest_remainder() {
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
