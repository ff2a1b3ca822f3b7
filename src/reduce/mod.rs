//! Element-wise reduction kernels on CPU.
//!
//! These are the CPU twins of the CUDA reduction kernels: same names, same argument
//! order. The operator is matched once per call, outside the loop, so each inner loop
//! is a plain `dst[i] = f(a[i], b[i])` that the compiler vectorises.

use crate::dtype::{DataType, Element, ReduceOp};

#[inline(always)]
fn zip_portable<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

#[inline(always)]
fn zip3_portable<T: Copy>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(*x, *y);
    }
}

/// The same loops compiled for AVX2, picked at run time: the crate is built for baseline
/// x86-64 (SSE2, 16-byte vectors); 32-byte vectors do twice the work per instruction,
/// which shows wherever the data is in cache (the runs:
/// `docs/perf-log/2026-11-27-reduce-kernels-avx2.md`). Element-wise operations give the
/// same bits at any vector width.
#[cfg(target_arch = "x86_64")]
mod wide {
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn zip<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
        super::zip_portable(dst, src, f)
    }

    /// # Safety
    /// The CPU must have AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn zip3<T: Copy>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
        super::zip3_portable(dst, a, b, f)
    }

    /// # Safety
    /// The CPU must have AVX2 ([`available`]); otherwise as for [`super::fold_tiles`].
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fold_tiles<T: crate::dtype::Element>(
        dst: *mut T,
        srcs: &[*const T],
        range: std::ops::Range<usize>,
        f: impl Fn(T, T) -> T + Copy,
        divide_by: Option<usize>,
    ) {
        // SAFETY: the caller's contract.
        unsafe { super::fold_tiles(dst, srcs, range, f, divide_by) }
    }
}

#[inline(always)]
fn zip_apply<T: Copy>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    #[cfg(target_arch = "x86_64")]
    if wide::available() {
        // SAFETY: the CPU has AVX2.
        return unsafe { wide::zip(dst, src, f) };
    }
    zip_portable(dst, src, f)
}

#[inline(always)]
fn zip3_apply<T: Copy>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    #[cfg(target_arch = "x86_64")]
    if wide::available() {
        // SAFETY: the CPU has AVX2.
        return unsafe { wide::zip3(dst, a, b, f) };
    }
    zip3_portable(dst, a, b, f)
}

/// `dst[i] = dst[i] (op) src[i]`. `Avg` accumulates as a sum; see [`reduce_finalize`].
///
/// Panics in debug builds if the lengths differ; callers pass equal lengths.
pub fn reduce_inplace<T: Element>(op: ReduceOp, dst: &mut [T], src: &[T]) {
    debug_assert_eq!(dst.len(), src.len());
    if half16::reduce_inplace(op, dst, src) {
        return;
    }
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
    if half16::reduce_from(op, dst, a, b) {
        return;
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip3_apply(dst, a, b, T::add),
        ReduceOp::Prod => zip3_apply(dst, a, b, T::mul),
        ReduceOp::Max => zip3_apply(dst, a, b, T::max),
        ReduceOp::Min => zip3_apply(dst, a, b, T::min),
    }
}

/// 16-bit floats in blocks: widen a block of each input to f32 with the `half` crate's
/// slice conversions (F16C where the CPU has it), apply the f32 operator, narrow back.
/// Bitwise the same as the per-element path (f32 op, one round-to-nearest-even), only
/// without a conversion call per element.
mod half16 {
    use std::any::TypeId;

    use half::slice::HalfFloatSliceExt;
    use half::{bf16, f16};

    use super::zip_apply;
    use crate::dtype::{Element, ReduceOp};

    const BLOCK: usize = 512;

    trait Narrow: Copy + bytemuck::Pod {
        fn widen(src: &[Self], dst: &mut [f32]);
        fn narrow(src: &[f32], dst: &mut [Self]);
    }
    impl Narrow for f16 {
        fn widen(src: &[Self], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst)
        }
        fn narrow(src: &[f32], dst: &mut [Self]) {
            dst.convert_from_f32_slice(src)
        }
    }
    impl Narrow for bf16 {
        fn widen(src: &[Self], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst)
        }
        fn narrow(src: &[f32], dst: &mut [Self]) {
            dst.convert_from_f32_slice(src)
        }
    }

    fn f32_op(op: ReduceOp, d: &mut [f32], s: &[f32]) {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => zip_apply(d, s, <f32 as Element>::add),
            ReduceOp::Prod => zip_apply(d, s, <f32 as Element>::mul),
            ReduceOp::Max => zip_apply(d, s, <f32 as Element>::max),
            ReduceOp::Min => zip_apply(d, s, <f32 as Element>::min),
        }
    }

    fn blocks<H: Narrow>(op: ReduceOp, dst: &mut [H], a: Option<&[H]>, b: &[H]) {
        let (mut x, mut y) = ([0f32; BLOCK], [0f32; BLOCK]);
        for (i, d) in dst.chunks_mut(BLOCK).enumerate() {
            let n = d.len();
            let range = i * BLOCK..i * BLOCK + n;
            match a {
                Some(a) => H::widen(&a[range.clone()], &mut x[..n]),
                None => H::widen(d, &mut x[..n]),
            }
            H::widen(&b[range], &mut y[..n]);
            f32_op(op, &mut x[..n], &y[..n]);
            H::narrow(&x[..n], d);
        }
    }

    fn run<T: Element>(op: ReduceOp, dst: &mut [T], a: Option<&[T]>, b: &[T]) -> bool {
        let t = TypeId::of::<T>();
        if t == TypeId::of::<f16>() {
            let a: Option<&[f16]> = a.map(bytemuck::cast_slice);
            blocks::<f16>(
                op,
                bytemuck::cast_slice_mut(dst),
                a,
                bytemuck::cast_slice(b),
            );
            true
        } else if t == TypeId::of::<bf16>() {
            let a: Option<&[bf16]> = a.map(bytemuck::cast_slice);
            blocks::<bf16>(
                op,
                bytemuck::cast_slice_mut(dst),
                a,
                bytemuck::cast_slice(b),
            );
            true
        } else {
            false
        }
    }

    /// Handles `dst op= src` for f16/bf16; false for other types.
    pub(super) fn reduce_inplace<T: Element>(op: ReduceOp, dst: &mut [T], src: &[T]) -> bool {
        run(op, dst, None, src)
    }

    /// Handles `dst = a op b` for f16/bf16; false for other types.
    pub(super) fn reduce_from<T: Element>(op: ReduceOp, dst: &mut [T], a: &[T], b: &[T]) -> bool {
        run(op, dst, Some(a), b)
    }
}

/// The reduction of `values` folded left to right (rank order), with `Avg`'s division
/// by `world_size` at the end: the element-wise reference the checkers compare
/// collectives against. `None` for no values.
pub fn fold<T: Element>(
    op: ReduceOp,
    values: impl IntoIterator<Item = T>,
    world_size: usize,
) -> Option<T> {
    let acc = values.into_iter().reduce(|acc, x| match op {
        ReduceOp::Sum | ReduceOp::Avg => T::add(acc, x),
        ReduceOp::Prod => T::mul(acc, x),
        ReduceOp::Max => T::max(acc, x),
        ReduceOp::Min => T::min(acc, x),
    })?;
    Some(if op == ReduceOp::Avg {
        acc.div_count(world_size)
    } else {
        acc
    })
}

/// The last step of a reduction: divides by `world_size` for `Avg`, nothing otherwise.
pub fn reduce_finalize<T: Element>(op: ReduceOp, dst: &mut [T], world_size: usize) {
    if op == ReduceOp::Avg {
        for d in dst.iter_mut() {
            *d = d.div_count(world_size);
        }
    }
}

/// Elements per step of [`reduce_n`]: 8 KiB of accumulator, which stays in L1 while
/// every source's piece streams through it.
const TILE_BYTES: usize = 8 << 10;

/// `dst[i] = finalize(srcs[0][i] (op) srcs[1][i] (op) ... (op) srcs[k-1][i])`, folded left
/// to right in exactly this order (so every caller gets bitwise the same result), in one
/// pass: each source is read once and `dst` written once, whatever `k`.
///
/// Works in L1-sized tiles: the first two sources are combined into a stack
/// accumulator, the others folded into it, `Avg` divided by `world_size`, and the tile
/// stored to `dst`. `dst` may be one of the sources (an in-place reduction), since a
/// tile is read completely before it is written. With one source this is a copy (plus
/// the `Avg` division).
///
/// # Safety
/// Every `srcs[j]` must be valid for reads of `len` elements and `dst` for writes of
/// `len` elements; `dst` either equals a source or overlaps none; nothing else writes
/// any of them during the call.
pub unsafe fn reduce_n<T: Element>(
    op: ReduceOp,
    dst: *mut T,
    srcs: &[*const T],
    len: usize,
    world_size: usize,
) {
    // SAFETY: the caller's contract.
    unsafe { reduce_n_range(op, dst, srcs, 0..len, world_size) }
}

/// [`reduce_n`] over the elements `range` of every buffer.
///
/// # Safety
/// As for [`reduce_n`] with `len = range.end`.
unsafe fn reduce_n_range<T: Element>(
    op: ReduceOp,
    dst: *mut T,
    srcs: &[*const T],
    range: std::ops::Range<usize>,
    world_size: usize,
) {
    if srcs.is_empty() {
        return;
    }
    let tile = TILE_BYTES / std::mem::size_of::<T>();
    let mut store = [0u64; TILE_BYTES / 8];
    // Every element type is at most 8 bytes with an alignment that divides 8.
    let acc_all: &mut [T] = bytemuck::cast_slice_mut(&mut store);
    let mut off = range.start;
    while off < range.end {
        let m = (range.end - off).min(tile);
        let acc = &mut acc_all[..m];
        // SAFETY: the caller guarantees `off + m <= range.end` elements are readable at
        // every source and that nobody writes them meanwhile; `dst` is written only
        // below, after the last read of this tile.
        let src = |j: usize| unsafe { std::slice::from_raw_parts(srcs[j].add(off), m) };
        if srcs.len() == 1 {
            acc.copy_from_slice(src(0));
        } else {
            reduce_from(op, acc, src(0), src(1));
            for j in 2..srcs.len() {
                reduce_inplace(op, acc, src(j));
            }
        }
        reduce_finalize(op, acc, world_size);
        // SAFETY: `dst` is valid for `range.end` writes; `acc` is on this stack frame.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.add(off), m) };
        off += m;
    }
}

/// Bytes per step of [`reduce_n_streaming`]: four cache lines, computed into a tile on
/// the stack and then written with streaming stores. A 16 KiB tile was slower in a
/// microbenchmark: the memory then sees the reads and the writes in long separate runs
/// instead of interleaved.
const LINE_TILE: usize = 256;

/// A [`LINE_TILE`]-byte tile aligned for 64-byte streaming stores.
#[repr(C, align(64))]
struct LineTile([u64; LINE_TILE / 8]);

/// Writes one [`LineTile`] to `dst` with streaming stores (x86-64; elsewhere a copy).
///
/// # Safety
/// `dst` must be 64-byte aligned and valid for [`LINE_TILE`] writes.
#[inline(always)]
unsafe fn stream_tile(dst: *mut u8, tile: &LineTile) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_load_si128, _mm_stream_si128};
        let src = tile.0.as_ptr().cast::<__m128i>();
        for k in 0..LINE_TILE / 16 {
            // SAFETY: both sides are 16-byte aligned and in bounds (`k < LINE_TILE / 16`).
            unsafe { _mm_stream_si128(dst.cast::<__m128i>().add(k), _mm_load_si128(src.add(k))) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(tile.0.as_ptr().cast::<u8>(), dst, LINE_TILE)
    };
}

/// The body of [`reduce_n_streaming`]: the whole tiles of elements `range`, which
/// starts at a 64-byte boundary of `dst`.
///
/// # Safety
/// The range's length a multiple of the tile's elements; otherwise as for
/// [`reduce_n_range`].
#[inline(always)]
unsafe fn fold_tiles<T: Element>(
    dst: *mut T,
    srcs: &[*const T],
    range: std::ops::Range<usize>,
    f: impl Fn(T, T) -> T + Copy,
    divide_by: Option<usize>,
) {
    let per = LINE_TILE / std::mem::size_of::<T>();
    let mut tile = LineTile([0; LINE_TILE / 8]);
    let mut off = range.start;
    while off < range.end {
        // SAFETY: `off + per <= range.end` elements are readable at every source; a source
        // equal to `dst` is read whole (below) before the tile is stored over it.
        let src = |j: usize| unsafe { std::slice::from_raw_parts(srcs[j].add(off), per) };
        let t: &mut [T] = bytemuck::cast_slice_mut(&mut tile.0);
        if srcs.len() == 1 {
            t.copy_from_slice(src(0));
        } else {
            zip3_portable(t, src(0), src(1), f);
            for j in 2..srcs.len() {
                zip_portable(t, src(j), f);
            }
        }
        if let Some(n) = divide_by {
            for x in t.iter_mut() {
                *x = x.div_count(n);
            }
        }
        // SAFETY: `dst + off` is 64-byte aligned (tiles are 64-byte multiples) and holds
        // `per` more elements.
        unsafe { stream_tile(dst.add(off).cast::<u8>(), &tile) };
        off += per;
    }
}

/// [`reduce_n`] for results that nobody reads again soon (a reduce-scatter's output):
/// the same bits, written with streaming stores in 256-byte tiles, which saves
/// the read of each destination line before it is written and keeps it out of the
/// cache. Ends with a store fence. These take [`reduce_n`] instead: 16-bit floats, whose
/// kernels work through f32 blocks; destinations not aligned to their element; and
/// reductions in place (`dst` one of the sources), whose lines were just read anyway:
/// there streaming stores were slower.
///
/// The current figures against ordinary stores, two cold inputs into a third
/// (`cargo bench --bench kernels -- reduce_from`): `docs/PERFORMANCE.md`, CPU kernels.
///
/// # Safety
/// As for [`reduce_n`].
pub unsafe fn reduce_n_streaming<T: Element>(
    op: ReduceOp,
    dst: *mut T,
    srcs: &[*const T],
    len: usize,
    world_size: usize,
) {
    let size = std::mem::size_of::<T>();
    let per = LINE_TILE / size;
    let head = dst.cast::<u8>().align_offset(64);
    let in_place = srcs.contains(&dst.cast_const());
    // The only 2-byte element types are f16 and bf16.
    if srcs.is_empty() || in_place || size == 2 || head % size != 0 || head / size + per > len {
        // SAFETY: the caller's contract.
        return unsafe { reduce_n(op, dst, srcs, len, world_size) };
    }
    let body = head / size..head / size + (len - head / size) / per * per;
    let divide_by = (op == ReduceOp::Avg).then_some(world_size);
    // SAFETY: head, body and tail partition `0..len`; each part meets the contract of
    // the call that handles it (the body starts at a 64-byte boundary of `dst`).
    unsafe {
        reduce_n_range(op, dst, srcs, 0..body.start, world_size);
        match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                fold_tiles_apply(dst, srcs, body.clone(), T::add, divide_by)
            }
            ReduceOp::Prod => fold_tiles_apply(dst, srcs, body.clone(), T::mul, divide_by),
            ReduceOp::Max => fold_tiles_apply(dst, srcs, body.clone(), T::max, divide_by),
            ReduceOp::Min => fold_tiles_apply(dst, srcs, body.clone(), T::min, divide_by),
        }
        #[cfg(target_arch = "x86_64")]
        std::arch::x86_64::_mm_sfence();
        reduce_n_range(op, dst, srcs, body.end..len, world_size);
    }
}

/// [`fold_tiles`] with AVX2 where the CPU has it.
///
/// # Safety
/// As for [`fold_tiles`].
#[inline(always)]
unsafe fn fold_tiles_apply<T: Element>(
    dst: *mut T,
    srcs: &[*const T],
    range: std::ops::Range<usize>,
    f: impl Fn(T, T) -> T + Copy,
    divide_by: Option<usize>,
) {
    #[cfg(target_arch = "x86_64")]
    if wide::available() {
        // SAFETY: the CPU has AVX2; otherwise the caller's contract.
        return unsafe { wide::fold_tiles(dst, srcs, range, f, divide_by) };
    }
    // SAFETY: the caller's contract.
    unsafe { fold_tiles(dst, srcs, range, f, divide_by) }
}

pub use crate::memcopy::{copy_bytes, copy_streaming};

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

/// [`reduce_from_bytes`] for a destination that nobody reads again soon, with
/// [`reduce_n_streaming`] where the three slices are aligned to their element (`Avg`
/// adds, as in [`reduce_from`]). Ends with a store fence.
pub fn reduce_from_bytes_streaming(
    dtype: DataType,
    op: ReduceOp,
    dst: &mut [u8],
    a: &[u8],
    b: &[u8],
) {
    let op = if op == ReduceOp::Avg {
        ReduceOp::Sum
    } else {
        op
    };
    crate::dispatch_dtype!(dtype, T => {
        match (typed_mut::<T>(dst), typed::<T>(a), typed::<T>(b)) {
            (Some(d), Some(a), Some(b)) if d.len() == a.len() && d.len() == b.len() => {
                // SAFETY: `a` and `b` hold `d.len()` elements; `d` is a distinct mutable
                // slice, so it overlaps neither.
                unsafe { reduce_n_streaming::<T>(op, d.as_mut_ptr(), &[a.as_ptr(), b.as_ptr()], d.len(), 1) }
            }
            _ => reduce_from_bytes(dtype, op, dst, a, b),
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

    /// Calls `$check` with a slice of edge values of each of several element types:
    /// NaN, infinities, signed zeros, huge values and integer extremes.
    macro_rules! with_edge_values {
        ($check:ident) => {
            $check(&[
                1.5f32,
                -0.0,
                0.0,
                f32::NAN,
                f32::INFINITY,
                -3.25,
                1e30,
                -7.0,
                2.0,
            ]);
            $check(&[1.5f64, -0.0, f64::NAN, f64::NEG_INFINITY, -3.25, 1e300, 9.0]);
            $check(&[i32::MAX, i32::MIN, -1, 0, 7, 123_456]);
            $check(&[u8::MAX, 0, 1, 17, 200]);
            $check(&[i64::MAX, -5, 3, i64::MIN]);
        };
    }

    /// The vector-width dispatch must not change a bit: every op, ragged lengths,
    /// NaN, infinities, signed zeros and integer wrap-around included.
    #[test]
    fn dispatched_kernels_equal_the_portable_loops() {
        fn check<T: Element + PartialEq + std::fmt::Debug>(vals: &[T]) {
            let n = 1037;
            let a: Vec<T> = (0..n).map(|i| vals[i % vals.len()]).collect();
            let b: Vec<T> = (0..n).map(|i| vals[(i * 7 + 3) % vals.len()]).collect();
            for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
                for len in [0, 1, 7, 8, 31, 33, 64, 1000, n] {
                    let f = |x: T, y: T| fold(op, [x, y], 2).unwrap();
                    let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
                    let (mut want, mut got) = (vec![T::zeroed(); len], vec![T::zeroed(); len]);
                    zip3_portable(&mut want, &a[..len], &b[..len], f);
                    reduce_from(op, &mut got, &a[..len], &b[..len]);
                    assert_eq!(bits(&got), bits(&want), "{op} from, {len} elements");
                    let mut got = a[..len].to_vec();
                    reduce_inplace(op, &mut got, &b[..len]);
                    assert_eq!(bits(&got), bits(&want), "{op} in place, {len} elements");
                }
            }
        }
        with_edge_values!(check);
    }

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
    fn fold_reduces_in_order_and_averages_at_the_end() {
        assert_eq!(fold(ReduceOp::Sum, [1i32, 2, 3], 3), Some(6));
        assert_eq!(fold(ReduceOp::Avg, [1i32, 2, 4], 3), Some(2));
        assert_eq!(fold(ReduceOp::Prod, [2.0f32, 3.0, 4.0], 3), Some(24.0));
        assert_eq!(fold(ReduceOp::Min, [5u8, 1, 9], 3), Some(1));
        // Left to right: (1e8 + 1) - 1e8 loses the 1 in f32.
        assert_eq!(fold(ReduceOp::Sum, [1e8f32, 1.0, -1e8], 3), Some(0.0));
        assert_eq!(fold(ReduceOp::Max, std::iter::empty::<f32>(), 0), None);
    }

    #[test]
    fn reduce_n_folds_in_rank_order_in_place_and_out_of_place() {
        // 3 sources, more than one tile of f32 (2048 per tile), odd length.
        let len = 5000;
        let a: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..len).map(|i| 1e8 + (i % 3) as f32).collect();
        let c: Vec<f32> = (0..len).map(|_| -1e8).collect();
        let mut out = vec![0.0f32; len];
        let srcs = [a.as_ptr(), b.as_ptr(), c.as_ptr()];
        // SAFETY: every source and `out` hold `len` elements and do not overlap.
        unsafe { reduce_n(ReduceOp::Sum, out.as_mut_ptr(), &srcs, len, 3) };
        for i in [0usize, 1, 2047, 2048, 4999] {
            // Left to right: (a + b) + c, which loses a's low bits to b's magnitude.
            assert_eq!(out[i], (a[i] + b[i]) + c[i], "element {i}");
        }
        assert_eq!(
            out[1], 0.0,
            "1 + (1e8 + 1) rounds to 1e8 in f32; minus 1e8 is 0"
        );

        // In place into the second source, Avg of i32 with world size 3.
        let x: Vec<i32> = (0..len as i32).collect();
        let mut y: Vec<i32> = (0..len as i32).map(|i| 2 * i).collect();
        let z: Vec<i32> = vec![3; len];
        let srcs = [x.as_ptr(), y.as_ptr(), z.as_ptr()];
        // SAFETY: `y` is both a source and the destination, exactly; lengths match.
        unsafe { reduce_n(ReduceOp::Avg, y.as_mut_ptr(), &srcs, len, 3) };
        for (i, v) in y.iter().enumerate() {
            assert_eq!(*v, (3 * i as i32 + 3) / 3);
        }

        // One source: a copy.
        let mut one = vec![0u8; 3];
        // SAFETY: three readable and three writable bytes.
        unsafe {
            reduce_n(
                ReduceOp::Max,
                one.as_mut_ptr(),
                &[[7u8, 8, 9].as_ptr()],
                3,
                1,
            )
        };
        assert_eq!(one, [7, 8, 9]);
    }

    #[test]
    fn copy_streaming_copies_every_byte_at_any_alignment() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        for (off, len) in [
            (0usize, 0usize),
            (1, 3),
            (3, 64),
            (5, 4000),
            (0, 4999),
            (63, 130),
        ] {
            let mut dst = vec![0xAAu8; 5100];
            // SAFETY: `off + len` fits both vectors; they do not overlap.
            unsafe { copy_streaming(dst.as_mut_ptr().add(off), src.as_ptr(), len) };
            assert_eq!(&dst[off..off + len], &src[..len], "off {off} len {len}");
            assert!(dst[..off].iter().all(|&b| b == 0xAA));
            assert!(dst[off + len..].iter().all(|&b| b == 0xAA));
        }
    }

    /// The streaming variant gives `reduce_n`'s bits for every op, source count, type,
    /// length and alignment of the destination, in place too, and writes nothing
    /// outside the destination.
    #[test]
    fn reduce_n_streaming_equals_reduce_n() {
        fn check<T: Element + std::fmt::Debug>(vals: &[T]) {
            let size = std::mem::size_of::<T>();
            let n = 2000;
            let src: Vec<Vec<T>> = (0..3)
                .map(|k| {
                    (0..n)
                        .map(|i| vals[(i * (k + 3) + k) % vals.len()])
                        .collect()
                })
                .collect();
            let bits = |v: &[T]| bytemuck::cast_slice::<T, u8>(v).to_vec();
            for op in [
                ReduceOp::Sum,
                ReduceOp::Prod,
                ReduceOp::Max,
                ReduceOp::Min,
                ReduceOp::Avg,
            ] {
                for k in 1..=3 {
                    for (skip, len) in [
                        (0, 0),
                        (0, 1),
                        (1, 70),
                        (3, 64 + 64 / size),
                        (5, 1900),
                        (0, 2000),
                    ] {
                        let srcs: Vec<*const T> =
                            src[..k].iter().map(|v| v[skip..].as_ptr()).collect();
                        let mut want = vec![T::zeroed(); n];
                        let mut got = vec![T::zeroed(); n];
                        // SAFETY: every source holds `n - skip >= len` elements, the
                        // destinations `n`; nothing overlaps.
                        unsafe {
                            reduce_n(op, want[skip..].as_mut_ptr(), &srcs, len, 3);
                            reduce_n_streaming(op, got[skip..].as_mut_ptr(), &srcs, len, 3);
                        }
                        assert_eq!(bits(&got), bits(&want), "{op}, {k} sources, {skip}+{len}");
                    }
                }
                // In place: the destination is the first source.
                let mut want = src[0].clone();
                let mut got = src[0].clone();
                // SAFETY: as above; the destination equals the first source.
                unsafe {
                    let w = want.as_mut_ptr();
                    reduce_n(op, w, &[w.cast_const(), src[1].as_ptr()], n, 2);
                    let g = got.as_mut_ptr();
                    reduce_n_streaming(op, g, &[g.cast_const(), src[1].as_ptr()], n, 2);
                }
                assert_eq!(bits(&got), bits(&want), "{op} in place");
            }
        }
        with_edge_values!(check);
        check(&[
            f16::from_f32(1.5),
            f16::from_f32(-2.0),
            f16::NAN,
            f16::from_f32(6e4),
        ]);
    }

    #[test]
    fn blocked_half_paths_equal_the_per_element_definition() {
        use half::bf16;
        let n = 1500; // not a multiple of the block
        let mut a: Vec<f16> = (0..n)
            .map(|i| f16::from_f32((i as f32 * 0.731).sin() * 300.0))
            .collect();
        a[7] = f16::from_f32(100.0);
        let mut b: Vec<f16> = (0..n)
            .map(|i| f16::from_f32((i as f32 * 0.17).cos() * 300.0))
            .collect();
        b[7] = f16::from_f32(65504.0); // sum overflows to inf, as IEEE says
        b[9] = f16::NAN;
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Max, ReduceOp::Min] {
            let mut d = a.clone();
            reduce_inplace(op, &mut d, &b);
            let mut e = vec![f16::ZERO; n];
            reduce_from(op, &mut e, &a, &b);
            for i in 0..n {
                let want = match op {
                    ReduceOp::Sum => <f16 as Element>::add(a[i], b[i]),
                    ReduceOp::Prod => <f16 as Element>::mul(a[i], b[i]),
                    ReduceOp::Max => <f16 as Element>::max(a[i], b[i]),
                    _ => <f16 as Element>::min(a[i], b[i]),
                };
                assert_eq!(d[i].to_bits(), want.to_bits(), "{op} f16 [{i}]");
                assert_eq!(e[i].to_bits(), want.to_bits(), "{op} f16 from [{i}]");
            }
            let ab: Vec<bf16> = a.iter().map(|x| bf16::from_f32(x.to_f32())).collect();
            let bb: Vec<bf16> = b
                .iter()
                .map(|x| bf16::from_f32(x.to_f32() * 1e30))
                .collect();
            let mut d = ab.clone();
            reduce_inplace(op, &mut d, &bb);
            for i in 0..n {
                let want = match op {
                    ReduceOp::Sum => <bf16 as Element>::add(ab[i], bb[i]),
                    ReduceOp::Prod => <bf16 as Element>::mul(ab[i], bb[i]),
                    ReduceOp::Max => <bf16 as Element>::max(ab[i], bb[i]),
                    _ => <bf16 as Element>::min(ab[i], bb[i]),
                };
                assert_eq!(d[i].to_bits(), want.to_bits(), "{op} bf16 [{i}]");
            }
        }
        let mut d = a.clone();
        reduce_inplace(ReduceOp::Sum, &mut d, &b);
        assert!(d[7].is_infinite() && d[7].to_f32() > 0.0, "{}", d[7]);
        assert!(d[9].is_nan());
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

    /// The streaming bytes entry gives `reduce_from_bytes`' bytes at every byte offset of
    /// its operands (misaligned ones take the ordinary path) and adds for `Avg`.
    #[test]
    fn streaming_bytes_entry_matches_the_ordinary_one() {
        let n = 1000;
        let a: Vec<u8> =
            bytemuck::cast_slice(&(0..n + 1).map(|i| i as f32 * 0.5).collect::<Vec<_>>()).to_vec();
        let b: Vec<u8> =
            bytemuck::cast_slice(&(0..n + 1).map(|i| 3.0 - i as f32).collect::<Vec<_>>()).to_vec();
        for op in ReduceOp::ALL {
            for (da, db, dd) in [(0, 0, 0), (1, 0, 0), (0, 2, 0), (0, 0, 3), (4, 4, 4)] {
                let len = 4 * n;
                let mut want = vec![0u8; len + 8];
                let mut got = vec![0u8; len + 8];
                let (sa, sb) = (&a[da..da + len], &b[db..db + len]);
                reduce_from_bytes(DataType::F32, op, &mut want[dd..dd + len], sa, sb);
                reduce_from_bytes_streaming(DataType::F32, op, &mut got[dd..dd + len], sa, sb);
                assert_eq!(got, want, "{op}, offsets {da} {db} {dd}");
            }
        }
    }
}
