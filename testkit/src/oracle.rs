//! The closed form of every collective: what rank `r` puts in, and what every rank must
//! get out, for each element type and reduction.
//!
//! Inputs are small integers whose reduction is exact in every element type (sums stay
//! below 128, products are powers of two), so a result is checked bitwise:
//!
//! | collective | rank r's input element i | expected element i |
//! | --- | --- | --- |
//! | all_reduce, reduce | `input(op, r, i, n)` | `expected(op, i, n)` |
//! | reduce_scatter (block b of `n * count`) | `input(op, r, b * count + i, n)` | `expected(op, r * count + i, n)` |
//! | all_gather, broadcast from `root`, recv from `left` | `input(Sum, r, i, n)` | `input(Sum, b, i, n)` in block b; `input(Sum, root, i, n)`; `input(Sum, left, i, n)` |

use hetccl::{Communicator, Element, ReduceOp, SharedBuf};

/// Rank r's input element i for `op`: small integers whose reduction is exact in
/// every element type (sums stay below 128, products are powers of two).
pub fn input<T: Element>(op: ReduceOp, r: usize, i: usize, n: usize) -> T {
    let v = match op {
        ReduceOp::Prod => 1 + (r + i) % 2,
        ReduceOp::Max | ReduceOp::Min => (r * 3 + i) % n.max(1) + (i % 5),
        ReduceOp::Sum | ReduceOp::Avg => 1 + r + (i % 7),
    };
    T::from_f64(v as f64)
}

/// Element i of the reduction over `n` ranks of their [`input`]s.
pub fn expected<T: Element>(op: ReduceOp, i: usize, n: usize) -> T {
    hetccl::reduce::fold(op, (0..n).map(|r| input::<T>(op, r, i, n)), n)
        .expect("a world has at least one rank")
}

/// `Err` naming the first element of `got` that differs from `want` (NaN matches NaN),
/// and how many do.
pub fn mismatch<T: Element>(
    what: &str,
    got: &[T],
    want: impl Fn(usize) -> T,
) -> Result<(), String> {
    for (i, g) in got.iter().enumerate() {
        let w = want(i);
        if *g != w && !(g.to_f64().is_nan() && w.to_f64().is_nan()) {
            let wrong = got
                .iter()
                .enumerate()
                .filter(|(j, x)| **x != want(*j))
                .count();
            return Err(format!(
                "{what}: element {i} is {g:?}, expected {w:?} ({wrong} wrong of {})",
                got.len()
            ));
        }
    }
    Ok(())
}

/// A buffer in private memory, or a window `[off, off + len)` of a shared one.
pub enum Buf<T: Element> {
    /// Memory of this process only.
    Private(Vec<T>),
    /// From `Communicator::alloc_shared`: the allocation, the window's start and length.
    Shared(SharedBuf<T>, usize, usize),
}

impl<T: Element> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Private(v) => v,
            Buf::Shared(s, off, len) => &s[*off..*off + *len],
        }
    }
}

impl<T: Element> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Buf::Private(v) => v,
            Buf::Shared(s, off, len) => &mut s[*off..*off + *len],
        }
    }
}

/// `data` in a private or (collectively allocated) shared buffer; shared ones start at
/// element `off` of a larger allocation, so sub-slices are what the collective sees.
pub fn make_buf<T: Element>(
    comm: &Communicator,
    shared: bool,
    off: usize,
    data: Vec<T>,
) -> Result<Buf<T>, String> {
    if !shared {
        return Ok(Buf::Private(data));
    }
    let mut s = comm
        .alloc_shared::<T>(off + data.len() + 2)
        .map_err(|e| e.to_string())?;
    s[off..off + data.len()].copy_from_slice(&data);
    Ok(Buf::Shared(s, off, data.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_products_and_extremes_of_the_inputs() {
        // Ranks 0..3 put in 1, 2, 3 (+ i % 7) for sums: 6 at i = 0, 9 at i = 1.
        assert_eq!(expected::<f32>(ReduceOp::Sum, 0, 3), 6.0);
        assert_eq!(expected::<i32>(ReduceOp::Sum, 1, 3), 9);
        assert_eq!(expected::<f32>(ReduceOp::Avg, 0, 3), 2.0);
        // 1 + (r + i) % 2 over 4 ranks: two 1s and two 2s.
        assert_eq!(expected::<u8>(ReduceOp::Prod, 5, 4), 4);
        // (3r + i) % n + i % 5 at i = 2, n = 3: 2, 2, 2 (+ 2).
        assert_eq!(expected::<f64>(ReduceOp::Max, 2, 3), 4.0);
        assert_eq!(input::<i64>(ReduceOp::Min, 1, 2, 3), 4);
    }

    #[test]
    fn mismatch_names_the_first_wrong_element_and_counts_them() {
        let got = [1.0f32, 5.0, 3.0, 9.0];
        let e = mismatch("all_reduce f32 sum count 4", &got, |i| (i + 1) as f32).unwrap_err();
        assert_eq!(
            e,
            "all_reduce f32 sum count 4: element 1 is 5.0, expected 2.0 (2 wrong of 4)"
        );
        assert_eq!(mismatch("nan", &[f32::NAN], |_| f32::NAN), Ok(()));
    }
}
