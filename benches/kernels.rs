//! CPU reduce kernels against memcpy, the ceiling any reduction step is measured by.
//!
//! `Throughput::Bytes` is the payload (bytes of `dst`). Memory traffic is larger:
//! memcpy reads and writes each byte once (2x); `reduce_inplace` reads `dst` and `src`
//! and writes `dst` (3x); so at sizes past the last-level cache a reduce running at
//! 2/3 of memcpy's payload rate is memory-bound, not compute-bound.
//!
//! Sizes: 256 KiB (fits L2: the executor's pipeline chunk) and 32 MiB (past LLC).
//!
//! ```text
//! cargo bench --bench kernels
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use hetccl::reduce::{reduce_inplace, reduce_n, reduce_n_streaming};
use hetccl::{Element, ReduceOp};

const SIZES: [usize; 2] = [256 << 10, 32 << 20];

fn label(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{}MiB", bytes >> 20)
    } else {
        format!("{}KiB", bytes >> 10)
    }
}

fn reduce_sum<T: Element>(c: &mut Criterion) {
    let name = T::DTYPE.name();
    let mut g = c.benchmark_group(format!("reduce_inplace/{name}/sum"));
    for bytes in SIZES {
        let n = bytes / std::mem::size_of::<T>();
        let mut dst: Vec<T> = (0..n).map(|i| T::from_f64((i % 7) as f64)).collect();
        // x + (-0.0) == x: the same loads, conversions, adds and stores as any other
        // values, but dst stays fixed, so no sample drifts into inf or rounding regimes.
        // (+0.0 would not do: an all-zero vec is calloc'd and reads hit the shared
        // zero page, which sits in cache and fakes bandwidth.)
        let src: Vec<T> = vec![T::from_f64(-0.0); n];
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::from_parameter(label(bytes)), |b| {
            b.iter(|| reduce_inplace(ReduceOp::Sum, black_box(&mut dst[..]), black_box(&src[..])))
        });
    }
    g.finish();
}

/// 16-bit floats with `half`'s slice conversions.
trait Half: Element {
    fn widen(src: &[Self], dst: &mut [f32]);
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl Half for f16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

impl Half for bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

/// Reference point, not library code: the same sum converting 256 elements at a time
/// with `half`'s slice conversions (F16C instructions for f16 where the CPU has them)
/// and adding f32 arrays the compiler vectorises. Rounding is the same (f32 add, one
/// round-to-nearest-even per element), so results equal `reduce_inplace`'s bit for
/// bit (checked before timing); the gap between the two groups is what blockwise
/// conversion would buy the library kernel.
fn sum_blockwise<T: Half>(dst: &mut [T], src: &[T]) {
    const B: usize = 256;
    let (mut a, mut b) = ([0f32; B], [0f32; B]);
    for (d, s) in dst.chunks_mut(B).zip(src.chunks(B)) {
        let n = d.len();
        T::widen(d, &mut a[..n]);
        T::widen(s, &mut b[..n]);
        for (x, y) in a[..n].iter_mut().zip(&b[..n]) {
            *x += *y;
        }
        T::narrow(&a[..n], d);
    }
}

fn reduce_sum_blockwise<T: Half>(c: &mut Criterion) {
    // Same results as the library kernel on values that round.
    let x: Vec<T> = (0..1000)
        .map(|i| T::from_f64(i as f64 * 0.37 - 100.0))
        .collect();
    let y: Vec<T> = (0..1000)
        .map(|i| T::from_f64(i as f64 * 1.13 + 0.01))
        .collect();
    let (mut lib, mut blk) = (x.clone(), x);
    reduce_inplace(ReduceOp::Sum, &mut lib, &y);
    sum_blockwise(&mut blk, &y);
    assert!(
        lib == blk,
        "blockwise reference differs from reduce_inplace"
    );

    let name = T::DTYPE.name();
    let mut g = c.benchmark_group(format!("reference_blockwise/{name}/sum"));
    for bytes in SIZES {
        let n = bytes / std::mem::size_of::<T>();
        let mut dst: Vec<T> = (0..n).map(|i| T::from_f64((i % 7) as f64)).collect();
        let src: Vec<T> = vec![T::from_f64(-0.0); n];
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::from_parameter(label(bytes)), |b| {
            b.iter(|| sum_blockwise(black_box(&mut dst[..]), black_box(&src[..])))
        });
    }
    g.finish();
}

fn memcpy(c: &mut Criterion) {
    let mut g = c.benchmark_group("memcpy");
    for bytes in SIZES {
        let src = vec![1u8; bytes];
        let mut dst = vec![0u8; bytes];
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(BenchmarkId::from_parameter(label(bytes)), |b| {
            b.iter(|| black_box(&mut dst[..]).copy_from_slice(black_box(&src[..])))
        });
    }
    g.finish();
}

/// `dst = a + b` into a destination that is not in cache, with ordinary stores
/// (`reduce_n`: each destination line is fetched before it is written) and with
/// streaming stores (`reduce_n_streaming`, what a reduce-scatter's own block gets from
/// `HETCCL_STREAM_MIN_BYTES` up). Payload: bytes of `dst`; 3 bytes of traffic per byte
/// with streaming stores, 4 without.
fn reduce_from_cold(c: &mut Criterion) {
    let mut g = c.benchmark_group("reduce_from/f32/sum");
    for bytes in [32usize << 20, 128 << 20] {
        let n = bytes / 4;
        let a: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let b_in: Vec<f32> = vec![-0.0; n];
        let mut dst = vec![1.0f32; n];
        let srcs = [a.as_ptr(), b_in.as_ptr()];
        g.throughput(Throughput::Bytes(bytes as u64));
        // A filter on the command line may skip both; then `dst` is as it started.
        let mut ran = false;
        for (name, streaming) in [("ordinary", false), ("streaming", true)] {
            let id = BenchmarkId::new(name, label(bytes));
            g.bench_function(id, |b| {
                ran = true;
                b.iter(|| {
                    let d = black_box(&mut dst[..]).as_mut_ptr();
                    // SAFETY: both sources and `dst` hold `n` elements; `dst` is
                    // distinct from the sources and nothing else touches them.
                    unsafe {
                        if streaming {
                            reduce_n_streaming(ReduceOp::Sum, d, &srcs, n, 1)
                        } else {
                            reduce_n(ReduceOp::Sum, d, &srcs, n, 1)
                        }
                    }
                })
            });
        }
        if ran {
            assert_eq!(dst[n - 1], ((n - 1) % 7) as f32);
        }
    }
    g.finish();
}

fn kernels(c: &mut Criterion) {
    memcpy(c);
    reduce_from_cold(c);
    reduce_sum::<f32>(c);
    reduce_sum::<f16>(c);
    reduce_sum::<bf16>(c);
    reduce_sum_blockwise::<f16>(c);
    reduce_sum_blockwise::<bf16>(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = kernels
}
criterion_main!(benches);
