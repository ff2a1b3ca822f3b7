//! fp16/bf16 compression kernels against single-thread memcpy of the same bytes.
//!
//! Throughput counts bytes read + written: `compress` with a residual reads 8 and writes
//! 6 bytes per element (src, residual in; wire, residual out), so its memcpy baseline
//! copies 7 bytes per element (7 read + 7 written). Sizes are past the last-level cache,
//! where both are bound by memory.
//!
//! `cargo bench --bench compression`

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use hetccl::compression;

const SIZES: [usize; 2] = [1 << 20, 16 << 20]; // elements: 4 MiB and 64 MiB of f32

fn inputs(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919) % 10007) as f32 * 1e-3 - 5.0)
        .collect()
}

fn bench_compress(c: &mut Criterion) {
    let mut g = c.benchmark_group("compress");
    g.sample_size(20);
    for n in SIZES {
        let src = inputs(n);
        let mut res = vec![0.0f32; n];
        let mut h = vec![f16::ZERO; n];
        let mut b = vec![bf16::ZERO; n];
        g.throughput(Throughput::Bytes(14 * n as u64));
        g.bench_with_input(
            BenchmarkId::new("fp16_compress+residual", n),
            &n,
            |bch, _| {
                bch.iter(|| {
                    compression::fp16_compress(black_box(&src), 0.25, Some(&mut res), &mut h)
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("bf16_compress+residual", n),
            &n,
            |bch, _| {
                bch.iter(|| {
                    compression::bf16_compress(black_box(&src), 0.25, Some(&mut res), &mut b)
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("reference::fp16_compress+residual", n),
            &n,
            |bch, _| {
                bch.iter(|| {
                    compression::reference::fp16_compress(
                        black_box(&src),
                        0.25,
                        Some(&mut res),
                        &mut h,
                    )
                })
            },
        );
        // memcpy of the same 14 bytes/element: 7 read + 7 written.
        let from = vec![1u8; 7 * n];
        let mut to = vec![0u8; 7 * n];
        g.bench_with_input(BenchmarkId::new("memcpy", n), &n, |bch, _| {
            bch.iter(|| to.copy_from_slice(black_box(&from)))
        });

        g.throughput(Throughput::Bytes(6 * n as u64));
        g.bench_with_input(BenchmarkId::new("fp16_compress", n), &n, |bch, _| {
            bch.iter(|| compression::fp16_compress(black_box(&src), 0.25, None, &mut h))
        });
        let from = vec![1u8; 3 * n];
        let mut to = vec![0u8; 3 * n];
        g.bench_with_input(BenchmarkId::new("memcpy-6B", n), &n, |bch, _| {
            bch.iter(|| to.copy_from_slice(black_box(&from)))
        });
    }
    g.finish();
}

fn bench_fused(c: &mut Criterion) {
    let mut g = c.benchmark_group("decompress_add_compress");
    g.sample_size(20);
    for n in SIZES {
        let local = inputs(n);
        let incoming = vec![f16::from_f32(0.5); n];
        let mut res = vec![0.0f32; n];
        let mut out = vec![f16::ZERO; n];
        // reads incoming 2 + local 4 + residual 4, writes 2 + 4
        g.throughput(Throughput::Bytes(16 * n as u64));
        g.bench_with_input(BenchmarkId::new("fp16+residual", n), &n, |bch, _| {
            bch.iter(|| {
                compression::fp16_decompress_add_compress(
                    black_box(&incoming),
                    &local,
                    0.25,
                    Some(&mut res),
                    &mut out,
                )
            })
        });
        let mut acc = vec![0.0f32; n];
        g.throughput(Throughput::Bytes(10 * n as u64));
        g.bench_with_input(BenchmarkId::new("fp16_decompress_add", n), &n, |bch, _| {
            bch.iter(|| compression::fp16_decompress_add(black_box(&incoming), &mut acc))
        });
        let from = vec![1u8; 8 * n];
        let mut to = vec![0u8; 8 * n];
        g.throughput(Throughput::Bytes(16 * n as u64));
        g.bench_with_input(BenchmarkId::new("memcpy", n), &n, |bch, _| {
            bch.iter(|| to.copy_from_slice(black_box(&from)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_compress, bench_fused);
criterion_main!(benches);
