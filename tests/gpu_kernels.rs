//! Every CUDA kernel against its CPU twin on random inputs.
//!
//! Results must be bitwise equal, except where a NaN's payload is not defined by the
//! policy (NaN inputs to decompress and to sum/prod reductions): there both sides must be
//! NaN. Each size runs with 16-byte-aligned buffers (vector path) and with views offset by
//! one element (scalar path).
//!
//! Built with the `cuda` feature only; without a usable GPU each test records itself as
//! skipped with the reason (`common::skip`), which the test script counts.

mod common;

#[cfg(feature = "cuda")]
mod gpu {
    use half::{bf16, f16};
    use hetccl::compression::{self, reference, OverflowStats, WireFloat};
    use hetccl::device::{
        self, CudaSlice, CudaView, Device, DevicePtrMut, DeviceRepr, GpuElement, Stream,
    };
    use hetccl::reduce;
    use hetccl::ReduceOp;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SIZES: [usize; 6] = [0, 1, 7, 1000, 4099, (1 << 20) + 3];

    fn open() -> Option<(Device, Stream)> {
        if let Err(why) = device::available() {
            super::common::skip(&why);
            return None;
        }
        let dev = Device::open(0).expect("a device was reported available");
        let stream = dev.new_stream().expect("stream");
        println!(
            "device 0: {} (sm_{}{})",
            dev.name(),
            dev.compute_capability().0,
            dev.compute_capability().1
        );
        Some((dev, stream))
    }

    /// Ordinary values plus, at 1% each, values beyond the fp16 and bf16 ranges (after the
    /// scale of 1.5), NaN/inf, fp16-subnormal results, f32 subnormals, random bit patterns.
    fn mixed(rng: &mut StdRng, n: usize) -> Vec<f32> {
        let sign = |rng: &mut StdRng| if rng.gen() { 1.0f32 } else { -1.0 };
        (0..n)
            .map(|_| match rng.gen_range(0..100) {
                0 => f32::from_bits(rng.gen()),
                1 => rng.gen_range(60000.0..80000.0) * sign(rng),
                2 => rng.gen_range(1e38..3.4e38) * sign(rng),
                3 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.gen_range(0..3)],
                4 => rng.gen_range(-1e-7..1e-7),
                5 => rng.gen_range(-1e-40..1e-40),
                _ => rng.gen_range(-4.0..4.0),
            })
            .collect()
    }

    fn same_or_both_nan(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn first_diff<T: PartialEq + Copy + std::fmt::Debug>(
        gpu: &[T],
        cpu: &[T],
    ) -> Option<(usize, T, T)> {
        gpu.iter()
            .zip(cpu)
            .enumerate()
            .find(|(_, (g, c))| g != c)
            .map(|(i, (g, c))| (i, *g, *c))
    }

    fn bits16<W: WireFloat>(v: &[W]) -> Vec<u16> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn bits32(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Buffers offset by `skew` elements from their allocation (1 = not 16-byte aligned).
    fn view_of<T>(s: &CudaSlice<T>, skew: usize) -> CudaView<'_, T> {
        s.slice(skew..)
    }

    fn upload_skewed<T: DeviceRepr + Copy + Default>(
        stream: &Stream,
        host: &[T],
        skew: usize,
    ) -> CudaSlice<T> {
        let mut v = vec![T::default(); skew];
        v.extend_from_slice(host);
        stream.upload(&v).expect("upload")
    }

    fn compress_case<W: WireFloat + DeviceRepr>(stream: &mut Stream, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for n in SIZES {
            for skew in [0usize, 1] {
                let src = mixed(&mut rng, n);
                let local = mixed(&mut rng, n);
                let res0: Vec<f32> = (0..n).map(|_| rng.gen_range(-1e-3..1e-3)).collect();
                let incoming: Vec<W> = (0..n).map(|_| W::from_bits(rng.gen())).collect();
                let scale = 1.5f32;

                // compress with and without residual
                for with_res in [true, false] {
                    let mut cpu_res = res0.clone();
                    let mut cpu_dst = vec![W::default(); n];
                    let cpu_stats = reference::compress(
                        &src,
                        scale,
                        with_res.then_some(cpu_res.as_mut_slice()),
                        &mut cpu_dst,
                    );
                    let g_src = upload_skewed(stream, &src, skew);
                    let mut g_res = upload_skewed(stream, &res0, skew);
                    let mut g_dst = stream.upload(&vec![W::default(); n + skew]).expect("alloc");
                    {
                        let src_v = view_of(&g_src, skew);
                        let mut res_v = g_res.slice_mut(skew..);
                        let mut dst_v = g_dst.slice_mut(skew..);
                        let r: Option<&mut dyn DevicePtrMut<f32>> =
                            if with_res { Some(&mut res_v) } else { None };
                        device::compress(stream, &src_v, scale, r, &mut dst_v).expect("launch");
                    }
                    let gpu_dst: Vec<W> =
                        stream.download(&g_dst).expect("download")[skew..].to_vec();
                    let gpu_res = stream.download(&g_res).expect("download")[skew..].to_vec();
                    let gpu_stats = stream.take_overflow_stats().expect("stats");
                    let what = format!(
                        "{}_compress n={n} skew={skew} residual={with_res}",
                        W::FORMAT.name()
                    );
                    assert_eq!(
                        first_diff(&bits16(&gpu_dst), &bits16(&cpu_dst)),
                        None,
                        "{what}: dst"
                    );
                    if with_res {
                        assert_eq!(
                            first_diff(&bits32(&gpu_res), &bits32(&cpu_res)),
                            None,
                            "{what}: residual"
                        );
                    }
                    assert_eq!(gpu_stats, cpu_stats, "{what}: stats");
                    if n > 100_000 {
                        assert!(
                            cpu_stats.overflow > 1000 && cpu_stats.nonfinite > 1000,
                            "{cpu_stats:?}"
                        );
                    }
                }

                // fused step with residual
                let mut cpu_res = res0.clone();
                let mut cpu_dst = vec![W::default(); n];
                let cpu_stats = reference::decompress_add_compress(
                    &incoming,
                    &local,
                    scale,
                    Some(&mut cpu_res),
                    &mut cpu_dst,
                );
                let g_inc = upload_skewed(stream, &incoming, skew);
                let g_loc = upload_skewed(stream, &local, skew);
                let mut g_res = upload_skewed(stream, &res0, skew);
                let mut g_dst = stream.upload(&vec![W::default(); n + skew]).expect("alloc");
                {
                    let (inc_v, loc_v) = (view_of(&g_inc, skew), view_of(&g_loc, skew));
                    let mut res_v = g_res.slice_mut(skew..);
                    let mut dst_v = g_dst.slice_mut(skew..);
                    device::decompress_add_compress(
                        stream,
                        &inc_v,
                        &loc_v,
                        scale,
                        Some(&mut res_v),
                        &mut dst_v,
                    )
                    .expect("launch");
                }
                let gpu_dst: Vec<W> = stream.download(&g_dst).expect("download")[skew..].to_vec();
                let gpu_res = stream.download(&g_res).expect("download")[skew..].to_vec();
                let gpu_stats = stream.take_overflow_stats().expect("stats");
                let what = format!(
                    "{}_decompress_add_compress n={n} skew={skew}",
                    W::FORMAT.name()
                );
                assert_eq!(
                    first_diff(&bits16(&gpu_dst), &bits16(&cpu_dst)),
                    None,
                    "{what}: dst"
                );
                assert_eq!(
                    first_diff(&bits32(&gpu_res), &bits32(&cpu_res)),
                    None,
                    "{what}: residual"
                );
                assert_eq!(gpu_stats, cpu_stats, "{what}: stats");

                // decompress and decompress_add: NaN payloads may differ
                for add in [false, true] {
                    let mut cpu = local.clone();
                    if add {
                        compression::decompress_add(&incoming, &mut cpu);
                    } else {
                        compression::decompress(&incoming, &mut cpu);
                    }
                    let mut g_out = upload_skewed(stream, &local, skew);
                    {
                        let inc_v = view_of(&g_inc, skew);
                        let mut out_v = g_out.slice_mut(skew..);
                        if add {
                            device::decompress_add(stream, &inc_v, &mut out_v).expect("launch");
                        } else {
                            device::decompress(stream, &inc_v, &mut out_v).expect("launch");
                        }
                    }
                    let gpu = stream.download(&g_out).expect("download")[skew..].to_vec();
                    let bad = gpu
                        .iter()
                        .zip(&cpu)
                        .position(|(g, c)| !same_or_both_nan(*g, *c));
                    assert_eq!(
                        bad,
                        None,
                        "{}_decompress add={add} n={n} skew={skew}",
                        W::FORMAT.name()
                    );
                }
            }
        }
        assert_eq!(
            stream.take_overflow_stats().expect("stats"),
            OverflowStats::default()
        );
    }

    #[test]
    fn fp16_kernels_match_cpu_twins() {
        let Some((_dev, mut stream)) = open() else {
            return;
        };
        compress_case::<f16>(&mut stream, 100);
    }

    #[test]
    fn bf16_kernels_match_cpu_twins() {
        let Some((_dev, mut stream)) = open() else {
            return;
        };
        compress_case::<bf16>(&mut stream, 101);
    }

    fn reduce_case<T: GpuElement + Default>(stream: &Stream, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        for n in SIZES {
            for skew in [0usize, 1] {
                // Small integers make ties (and ±0) common, so max/min tie-breaking is tested;
                // NaN at 0.5% checks propagation.
                let gen = |rng: &mut StdRng| -> T {
                    match rng.gen_range(0..200) {
                        0 => T::from_f64(f64::NAN),
                        1 => T::from_f64(-0.0),
                        2..=100 => T::from_f64(rng.gen_range(-4i32..=4) as f64),
                        _ => T::from_f64(rng.gen_range(-3.0..3.0)),
                    }
                };
                let a: Vec<T> = (0..n).map(|_| gen(&mut rng)).collect();
                let b: Vec<T> = (0..n).map(|_| gen(&mut rng)).collect();
                for op in [
                    ReduceOp::Sum,
                    ReduceOp::Avg,
                    ReduceOp::Prod,
                    ReduceOp::Max,
                    ReduceOp::Min,
                ] {
                    // CPU: a (op) b, then finalize as for a world of 3.
                    let mut cpu_in = a.clone();
                    reduce::reduce_inplace(op, &mut cpu_in, &b);
                    reduce::reduce_finalize(op, &mut cpu_in, 3);
                    let mut cpu_from = vec![T::default(); n];
                    reduce::reduce_from(op, &mut cpu_from, &a, &b);

                    let mut g_a = upload_skewed(stream, &a, skew);
                    let g_b = upload_skewed(stream, &b, skew);
                    let mut g_out = stream.upload(&vec![T::default(); n + skew]).expect("alloc");
                    {
                        let b_v = view_of(&g_b, skew);
                        {
                            let a_v = view_of(&g_a, skew);
                            let mut out_v = g_out.slice_mut(skew..);
                            device::reduce_from(stream, op, &mut out_v, &a_v, &b_v)
                                .expect("launch");
                        }
                        let mut a_v = g_a.slice_mut(skew..);
                        device::reduce_inplace(stream, op, &mut a_v, &b_v).expect("launch");
                        device::reduce_finalize(stream, op, &mut a_v, 3).expect("launch");
                    }
                    let gpu_in = stream.download(&g_a).expect("download")[skew..].to_vec();
                    let gpu_from = stream.download(&g_out).expect("download")[skew..].to_vec();
                    // Sum/prod of a NaN: payloads are not specified; max/min: canonical NaN, bitwise.
                    let nan_lenient = matches!(op, ReduceOp::Sum | ReduceOp::Avg | ReduceOp::Prod);
                    for (label, gpu, cpu) in [
                        ("inplace+finalize", &gpu_in, &cpu_in),
                        ("from", &gpu_from, &cpu_from),
                    ] {
                        let bad = gpu.iter().zip(cpu.iter()).position(|(g, c)| {
                            let (gb, cb) = (bytemuck::bytes_of(g), bytemuck::bytes_of(c));
                            gb != cb && !(nan_lenient && g.to_f64().is_nan() && c.to_f64().is_nan())
                        });
                        if let Some(i) = bad {
                            panic!(
                                "reduce_{label}_{op}_{} n={n} skew={skew}: element {i}: gpu {:?} cpu {:?} (a {:?}, b {:?})",
                                T::NAME, gpu[i], cpu[i], a[i], b[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn reductions_match_cpu_twins() {
        let Some((_dev, stream)) = open() else { return };
        reduce_case::<f32>(&stream, 200);
        reduce_case::<f16>(&stream, 201);
        reduce_case::<bf16>(&stream, 202);
    }

    #[test]
    fn length_mismatch_is_an_error_not_a_launch() {
        let Some((_dev, stream)) = open() else { return };
        let src = stream.alloc_zeros::<f32>(10).expect("alloc");
        let mut dst = stream.alloc_zeros::<f16>(9).expect("alloc");
        let e = device::fp16_compress(&stream, &src, 1.0, None, &mut dst).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument to device::compress: src has 10 elements, expected 9"
        );
    }

    #[test]
    fn event_timing_measures_a_copy() {
        let Some((_dev, stream)) = open() else { return };
        let a = stream.alloc_zeros::<f32>(1 << 20).expect("alloc");
        let mut b = stream.alloc_zeros::<f32>(1 << 20).expect("alloc");
        let ms = stream.time(|s| s.copy(&a, &mut b)).expect("timing");
        // Only that a timing came back: no assertion on speed in tests.
        assert!(ms.is_finite() && ms >= 0.0, "{ms}");
    }
}
