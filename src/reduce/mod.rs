//! Element-wise reduction kernels on CPU.
//!
//! These are the CPU twins of the CUDA reduction kernels: same names, same argument
//! order. The operator is matched once per call, outside the loop, so each inner loop
//! is a plain `dst[i] = f(a[i], b[i])` that the compiler vectorises.

use crate::dtype::{DataType, Element, ReduceOp};

#[inline(always)]
fn zip_apply<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

#[inline(always)]
fn zip3_apply<T: Copy>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(*x, *y);
    }
}

/// `dst[i] = dst[i] (op) src[i]`. `Avg` accumulates as a sum; see [`reduce_finalize`].
///
/// Panics in debug builds if the lengths differ; callers pass equal lengths.
pub fn reduce_inplace<T: Element>(op: ReduceOp, dst: &mut [T], src: &[T]) {
    debug_assert_eq!(dst.len(), src.len());
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_apply(dst, src, T::add),
        ReduceOp::Prod => zip_apply(dst, src, T::mul),
        ReduceOp::Max => zip_apply(dst, src, T::max),
        ReduceOp::Min => zip_apply(dst, src, T::min),
    }
}

/// `dst[i] = a[i] (op) b[i]`: reduce two inputs into a third buffer in one pass.
pub fn reduce_from<T: Element>(op: ReduceOp, dst: &mut [T], a: &[T], b: &[T]) {
    debug_assert_eq!(dst.len(), a.len());
    debug_assert_eq!(dst.len(), b.len());
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip3_apply(dst, a, b, T::add),
        ReduceOp::Prod => zip3_apply(dst, a, b, T::mul),
        ReduceOp::Max => zip3_apply(dst, a, b, T::max),
        ReduceOp::Min => zip3_apply(dst, a, b, T::min),
    }
}

/// The last step of a reduction: divides by `world_size` for `Avg`, nothing otherwise.
pub fn reduce_finalize<T: Element>(op: ReduceOp, dst: &mut [T], world_size: usize) {
    if op == ReduceOp::Avg {
        for d in dst.iter_mut() {
            *d = d.div_count(world_size);
        }
    }
}

/// Views raw bytes as a typed slice; falls back to `None` on misalignment.
fn typed<T: Element>(bytes: &[u8]) -> Option<&[T]> {
    bytemuck::try_cast_slice(bytes).ok()
}

fn typed_mut<T: Element>(bytes: &mut [u8]) -> Option<&mut [T]> {
    bytemuck::try_cast_slice_mut(bytes).ok()
}

/// Type-erased [`reduce_inplace`] over byte slices holding `dtype` elements.
///
/// Lengths must be equal multiples of the element size. Misaligned inputs (possible for
/// bytes straight out of a transport buffer) take a slower copying path.
pub fn reduce_inplace_bytes(dtype: DataType, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    crate::dispatch_dtype!(dtype, T => {
        match (typed_mut::<T>(dst), typed::<T>(src)) {
            (Some(d), Some(s)) => reduce_inplace::<T>(op, d, s),
            (d, _) => {
                // Rare: copy the misaligned side into an aligned temporary.
                let s: Vec<T> = bytemuck::pod_collect_to_vec(src);
                match d {
                    Some(d) => reduce_inplace::<T>(op, d, &s),
                    None => {
                        let mut dv: Vec<T> = bytemuck::pod_collect_to_vec(dst);
                        reduce_inplace::<T>(op, &mut dv, &s);
                        dst.copy_from_slice(bytemuck::cast_slice(&dv));
                    }
                }
            }
        }
    })
}

/// Type-erased [`reduce_from`].
pub fn reduce_from_bytes(dtype: DataType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    crate::dispatch_dtype!(dtype, T => {
        match (typed_mut::<T>(dst), typed::<T>(a), typed::<T>(b)) {
            (Some(d), Some(a), Some(b)) => reduce_from::<T>(op, d, a, b),
            _ => {
                dst.copy_from_slice(a);
                reduce_inplace_bytes(dtype, op, dst, b);
            }
        }
    })
}

/// Type-erased [`reduce_finalize`].
pub fn reduce_finalize_bytes(dtype: DataType, op: ReduceOp, dst: &mut [u8], world_size: usize) {
    if op != ReduceOp::Avg {
        return;
    }
    crate::dispatch_dtype!(dtype, T => {
        match typed_mut::<T>(dst) {
            Some(d) => reduce_finalize::<T>(op, d, world_size),
            None => {
                let mut dv: Vec<T> = bytemuck::pod_collect_to_vec(dst);
                reduce_finalize::<T>(op, &mut dv, world_size);
                dst.copy_from_slice(bytemuck::cast_slice(&dv));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn every_op_on_f32() {
        let a = [1.0f32, -2.0, 3.0, 4.0];
        let b = [2.0f32, 5.0, -1.0, 4.0];
        let cases = [
            (ReduceOp::Sum, [3.0, 3.0, 2.0, 8.0]),
            (ReduceOp::Prod, [2.0, -10.0, -3.0, 16.0]),
            (ReduceOp::Max, [2.0, 5.0, 3.0, 4.0]),
            (ReduceOp::Min, [1.0, -2.0, -1.0, 4.0]),
        ];
        for (op, want) in cases {
            let mut d = a;
            reduce_inplace(op, &mut d, &b);
            assert_eq!(d, want, "{op}");
            let mut e = [0.0f32; 4];
            reduce_from(op, &mut e, &a, &b);
            assert_eq!(e, want, "{op}");
        }
        let mut d = [4.0f32, 6.0];
        reduce_finalize(ReduceOp::Avg, &mut d, 2);
        assert_eq!(d, [2.0, 3.0]);
    }

    #[test]
    fn bytes_dispatch_matches_typed_and_handles_misalignment() {
        let a: Vec<f16> = (0..9).map(|i| f16::from_f32(i as f32)).collect();
        let b: Vec<f16> = (0..9).map(|i| f16::from_f32(2.0 * i as f32)).collect();
        let mut d = a.clone();
        reduce_inplace_bytes(
            DataType::F16,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&b),
        );
        let want: Vec<f16> = (0..9).map(|i| f16::from_f32(3.0 * i as f32)).collect();
        assert_eq!(d, want);

        // src starting at an odd address
        let mut raw = [0u8; 4 * 3 + 1];
        raw[1..].copy_from_slice(bytemuck::cast_slice(&[1i32, 2, 3]));
        let mut dst = [10i32, 20, 30];
        reduce_inplace_bytes(
            DataType::I32,
            ReduceOp::Max,
            bytemuck::cast_slice_mut(&mut dst),
            &raw[1..],
        );
        assert_eq!(dst, [10, 20, 30]);
    }
}
