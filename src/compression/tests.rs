use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Log-uniform magnitudes in `[lo, hi)`, random sign.
fn log_uniform(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let m = (rng.gen_range(lo.ln()..hi.ln())).exp();
            (if rng.gen::<bool>() { m } else { -m }) as f32
        })
        .collect()
}

/// A mix that exercises every branch: ordinary values, values beyond the fp16 and bf16
/// ranges (after the scale of 1.5 used below), NaN and infinities, fp16 and f32
/// subnormals, and arbitrary bit patterns.
fn mixed_inputs(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let sign = |rng: &mut StdRng| if rng.gen() { 1.0 } else { -1.0 };
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

#[test]
fn fp16_round_trip_relative_error_is_at_most_half_ulp() {
    let mut rng = StdRng::seed_from_u64(1);
    // fp16 normal range: [2^-14, 65504].
    let src = log_uniform(&mut rng, 100_000, 6.103_515_625e-5, 65504.0);
    let mut wire = vec![f16::ZERO; src.len()];
    let mut res = vec![0.0f32; src.len()];
    let stats = fp16_compress(&src, 1.0, Some(&mut res), &mut wire);
    assert_eq!(stats, OverflowStats::default());
    let mut back = vec![0.0f32; src.len()];
    fp16_decompress(&wire, &mut back);
    let mut worst = 0.0f64;
    for i in 0..src.len() {
        let (x, y) = (src[i] as f64, back[i] as f64);
        worst = worst.max(((y - x) / x).abs());
        // The residual is exactly what rounding dropped.
        assert_eq!(x - y, res[i] as f64, "element {i}: {x}");
    }
    assert!(worst <= 2f64.powi(-11), "worst relative error {worst:e}");
    // And the bound is tight: some value lands close to a midpoint.
    assert!(
        worst > 0.9 * 2f64.powi(-11),
        "worst relative error {worst:e}"
    );
}

#[test]
fn bf16_round_trip_relative_error_is_at_most_half_ulp() {
    let mut rng = StdRng::seed_from_u64(2);
    let src = log_uniform(&mut rng, 100_000, 1e-30, 1e30);
    let mut wire = vec![bf16::ZERO; src.len()];
    let mut res = vec![0.0f32; src.len()];
    let stats = bf16_compress(&src, 1.0, Some(&mut res), &mut wire);
    assert_eq!(stats, OverflowStats::default());
    let mut back = vec![0.0f32; src.len()];
    bf16_decompress(&wire, &mut back);
    let mut worst = 0.0f64;
    for i in 0..src.len() {
        let (x, y) = (src[i] as f64, back[i] as f64);
        worst = worst.max(((y - x) / x).abs());
        assert_eq!(x - y, res[i] as f64, "element {i}: {x}");
    }
    assert!(worst <= 2f64.powi(-8), "worst relative error {worst:e}");
    assert!(
        worst > 0.9 * 2f64.powi(-8),
        "worst relative error {worst:e}"
    );
}

#[test]
fn decompress_add_adds_in_f32() {
    let wire: Vec<f16> = [1.5f32, -2.0, 0.25]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let mut dst = [1.0f32, 1.0, 1e8];
    fp16_decompress_add(&wire, &mut dst);
    assert_eq!(dst, [2.5, -1.0, 1e8]);
    let wire: Vec<bf16> = [3.0f32, -0.5].iter().map(|&x| bf16::from_f32(x)).collect();
    let mut dst = [1.0f32, 0.5];
    bf16_decompress_add(&wire, &mut dst);
    assert_eq!(dst, [4.0, 0.0]);
}

#[test]
fn fp16_overflow_saturates_and_nonfinite_propagates() {
    let src = [
        1.0f32,
        70000.0,
        -1e6,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        65519.0,
        3.0e38,
    ];
    let mut res = [0.0f32; 9];
    let mut dst = [f16::ZERO; 9];
    for (label, fast) in [("fast", true), ("reference", false)] {
        res.fill(0.0);
        // 3e38 * 2 overflows f32 itself: a finite input, so it saturates, not inf.
        let scaled: Vec<f32> = src
            .iter()
            .map(|&x| if x == 3.0e38 { x } else { x / 2.0 })
            .collect();
        let stats = if fast {
            fp16_compress(&scaled, 2.0, Some(&mut res), &mut dst)
        } else {
            reference::fp16_compress(&scaled, 2.0, Some(&mut res), &mut dst)
        };
        assert_eq!(
            stats,
            OverflowStats {
                overflow: 4,
                nonfinite: 3
            },
            "{label}"
        );
        let bits: Vec<u16> = dst.iter().map(|d| d.to_bits()).collect();
        assert_eq!(
            bits,
            [0x3C00, 0x7BFF, 0xFBFF, 0x7E00, 0x7C00, 0xFC00, 0x7BFF, 0x7BFF, 0x7BFF],
            "{label}"
        );
        assert_eq!(
            res,
            [0.0, 4496.0, -934496.0, 0.0, 0.0, 0.0, 0.0, 15.0, 0.0],
            "{label}"
        );
    }
}

#[test]
fn bf16_overflow_saturates_at_f32_edge() {
    // 3.4e38 is a finite f32 above bf16's largest value 3.3895314e38.
    let src = [3.4e38f32, -3.4e38, 1.0, f32::NAN];
    let mut res = [0.0f32; 4];
    let mut dst = [bf16::ZERO; 4];
    let stats = bf16_compress(&src, 1.0, Some(&mut res), &mut dst);
    assert_eq!(
        stats,
        OverflowStats {
            overflow: 2,
            nonfinite: 1
        }
    );
    let bits: Vec<u16> = dst.iter().map(|d| d.to_bits()).collect();
    assert_eq!(bits, [0x7F7F, 0xFF7F, 0x3F80, 0x7FC0]);
    assert_eq!(res[0], 3.4e38 - 3.389_531_4e38);
    assert_eq!(res[1], -(3.4e38 - 3.389_531_4e38));
}

#[test]
fn fused_step_rounds_once_and_counts() {
    // incoming 60000 + local 20000*0.5 = 70000 > 65504: saturated, residual keeps 4496.
    let incoming: Vec<f16> = [60000.0f32, 1.0, 1.0, 2.0]
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let local = [20000.0f32, f32::NAN, 1e-4, 2.0];
    let mut res = [0.0f32, 0.0, 0.0, 0.5];
    let mut dst = [f16::ZERO; 4];
    let stats = fp16_decompress_add_compress(&incoming, &local, 0.5, Some(&mut res), &mut dst);
    assert_eq!(
        stats,
        OverflowStats {
            overflow: 1,
            nonfinite: 1
        }
    );
    assert_eq!(dst[0].to_bits(), 0x7BFF);
    assert_eq!(res[0], 4496.0);
    assert_eq!(dst[1].to_bits(), 0x7E00);
    assert_eq!(res[1], 0.0);
    // 1 + 5e-5 rounds to 1 in fp16 (ulp 2^-10); the 5e-5 (as rounded in f32) is kept.
    assert_eq!(dst[2].to_f32(), 1.0);
    assert_eq!(res[2], (1.0f32 + 1e-4f32 * 0.5) - 1.0);
    // 2 + (2*0.5 + 0.5) = 3.5 exactly.
    assert_eq!(dst[3].to_f32(), 3.5);
    assert_eq!(res[3], 0.0);
}

/// Runs `steps` all-reduce-like steps of one fixed gradient on one rank: compress,
/// decompress, accumulate in f64. Returns the worst |accumulated - steps·g| / |g| over
/// all elements and all steps, and the mean of |accumulated - steps·g| at the end.
fn accumulate(g: &[f32], steps: usize, error_feedback: bool) -> (f64, f64) {
    let mut res = vec![0.0f32; g.len()];
    let mut wire = vec![f16::ZERO; g.len()];
    let mut dec = vec![0.0f32; g.len()];
    let mut acc = vec![0.0f64; g.len()];
    let mut worst_rel = 0.0f64;
    for t in 1..=steps {
        let r = if error_feedback {
            Some(res.as_mut_slice())
        } else {
            None
        };
        assert!(fp16_compress(g, 1.0, r, &mut wire).is_clean());
        fp16_decompress(&wire, &mut dec);
        for i in 0..g.len() {
            acc[i] += dec[i] as f64;
            let err = (acc[i] - t as f64 * g[i] as f64).abs();
            worst_rel = worst_rel.max(err / (g[i] as f64).abs());
        }
    }
    let mean_abs = (0..g.len())
        .map(|i| (acc[i] - steps as f64 * g[i] as f64).abs())
        .sum::<f64>()
        / g.len() as f64;
    (worst_rel, mean_abs)
}

#[test]
fn error_feedback_keeps_accumulated_error_bounded() {
    let mut rng = StdRng::seed_from_u64(3);
    let g = log_uniform(&mut rng, 4096, 1e-3, 1.0);
    let (ef_worst, ef_mean) = accumulate(&g, 1000, true);
    let (raw_worst, raw_mean) = accumulate(&g, 1000, false);
    // With feedback the accumulated error is the current residual, at most half an fp16
    // ulp of g, plus f32 rounding of `g + residual` once per step (1000 · 2^-24 · |g|).
    let bound = 2f64.powi(-11) + 1000.0 * 2f64.powi(-24);
    assert!(
        ef_worst <= bound,
        "with feedback: worst {ef_worst:e} > {bound:e}"
    );
    // Without it the rounding error of g repeats every step and grows linearly:
    // 1000 steps of on average a quarter ulp.
    assert!(raw_worst > 0.4, "without feedback: worst {raw_worst:e}");
    assert!(
        raw_mean > 200.0 * ef_mean,
        "mean error {raw_mean:e} vs {ef_mean:e}"
    );
}

fn bits16<W: WireFloat>(v: &[W]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn fast_matches_reference<W: WireFloat>(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for n in [0usize, 1, 7, 8, 9, 1000, (1 << 20) + 3] {
        let src = mixed_inputs(&mut rng, n);
        let local = mixed_inputs(&mut rng, n);
        let res0: Vec<f32> = (0..n).map(|_| rng.gen_range(-1e-3..1e-3)).collect();
        let wire_in: Vec<W> = (0..n).map(|_| W::from_bits(rng.gen())).collect();
        let scale = 1.5f32;

        let (mut d1, mut d2) = (vec![W::default(); n], vec![W::default(); n]);
        let (mut r1, mut r2) = (res0.clone(), res0.clone());
        let s1 = compress(&src, scale, Some(&mut r1), &mut d1);
        let s2 = reference::compress(&src, scale, Some(&mut r2), &mut d2);
        assert_eq!(
            (bits16(&d1), bits32(&r1), s1),
            (bits16(&d2), bits32(&r2), s2),
            "compress n={n}"
        );
        if n > 1000 {
            // The mix must actually reach the rare paths.
            assert!(s1.overflow > 1000 && s1.nonfinite > 1000, "{s1:?}");
        }
        let s1 = compress(&src, scale, None, &mut d1);
        let s2 = reference::compress(&src, scale, None, &mut d2);
        assert_eq!(
            (bits16(&d1), s1),
            (bits16(&d2), s2),
            "compress no residual n={n}"
        );

        let (mut r1, mut r2) = (res0.clone(), res0.clone());
        let s1 = decompress_add_compress(&wire_in, &local, scale, Some(&mut r1), &mut d1);
        let s2 =
            reference::decompress_add_compress(&wire_in, &local, scale, Some(&mut r2), &mut d2);
        assert_eq!(
            (bits16(&d1), bits32(&r1), s1),
            (bits16(&d2), bits32(&r2), s2),
            "fused n={n}"
        );
        let s1 = decompress_add_compress(&wire_in, &local, scale, None, &mut d1);
        let s2 = reference::decompress_add_compress(&wire_in, &local, scale, None, &mut d2);
        assert_eq!(
            (bits16(&d1), s1),
            (bits16(&d2), s2),
            "fused no residual n={n}"
        );

        let (mut f1, mut f2) = (vec![0.0f32; n], vec![0.0f32; n]);
        decompress(&wire_in, &mut f1);
        reference::decompress(&wire_in, &mut f2);
        assert_eq!(bits32(&f1), bits32(&f2), "decompress n={n}");
        let (mut f1, mut f2) = (local.clone(), local.clone());
        decompress_add(&wire_in, &mut f1);
        reference::decompress_add(&wire_in, &mut f2);
        // NaN + x keeps "a" NaN payload, and which one is unspecified (the optimiser may
        // swap the operands of the scalar loop): NaNs compare as NaN, the rest bitwise.
        let canon = |v: &[f32]| -> Vec<u32> {
            v.iter()
                .map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() })
                .collect()
        };
        assert_eq!(canon(&f1), canon(&f2), "decompress_add n={n}");
    }
}

#[test]
fn fp16_fast_path_matches_reference_bitwise() {
    fast_matches_reference::<f16>(10);
}

#[test]
fn bf16_fast_path_matches_reference_bitwise() {
    fast_matches_reference::<bf16>(11);
}

#[test]
fn fp16_subnormal_results_round_like_reference() {
    // Every f32 between 0 and the smallest fp16 normal, stepping through many exponents:
    // exercises subnormal rounding in vcvtps2ph against the software reference.
    let src: Vec<f32> = (0..200_000u32)
        .map(|i| f32::from_bits(0x2F00_0000 + i * 797))
        .collect();
    let (mut d1, mut d2) = (vec![f16::ZERO; src.len()], vec![f16::ZERO; src.len()]);
    let (mut r1, mut r2) = (vec![0.0f32; src.len()], vec![0.0f32; src.len()]);
    fp16_compress(&src, 1.0, Some(&mut r1), &mut d1);
    reference::fp16_compress(&src, 1.0, Some(&mut r2), &mut d2);
    assert_eq!(bits16(&d1), bits16(&d2));
    assert_eq!(bits32(&r1), bits32(&r2));
    assert!(
        src.last().is_some_and(|&x| x > 6.1e-5),
        "covers up to the normal range"
    );
}

#[test]
fn wire_constants_match_half() {
    assert_eq!(<f16 as WireFloat>::MAX, f16::MAX.to_f32());
    assert_eq!(<bf16 as WireFloat>::MAX, bf16::MAX.to_f32());
    assert_eq!(<f16 as WireFloat>::MAX_BITS, f16::MAX.to_bits());
    assert_eq!(<bf16 as WireFloat>::MAX_BITS, bf16::MAX.to_bits());
    assert_eq!(<f16 as WireFloat>::INF_BITS, f16::INFINITY.to_bits());
    assert_eq!(<bf16 as WireFloat>::INF_BITS, bf16::INFINITY.to_bits());
    assert_eq!(
        WireFormat::from_u8(WireFormat::Bf16 as u8),
        Some(WireFormat::Bf16)
    );
    assert_eq!(WireFormat::from_u8(2), None);
}
