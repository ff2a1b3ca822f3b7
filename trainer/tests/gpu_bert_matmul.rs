//! The matrix products of `gpu_blas` (cuBLAS) against their CPU twins in trainer/src/ops.rs,
//! at sizes that are not multiples of a warp, a tile or each other. Skipped, with the
//! reason, without a CUDA driver, a device or cuBLAS.
//!
//! Tolerance of a product element `Σ_k a·b` (plus a bias or an accumulator `z`), from its
//! scale `S = Σ_k |a|·|b| + |z|` (the same op run on absolute values): fp32 `|GPU - CPU| ≤
//! 2·k·2⁻²⁴·S + 1e-30` (both sum k products in some order, each rounding at most
//! `k·2⁻²⁴·S`); TF32 `≤ 2⁻⁹·S` (each input rounded by at most 2⁻¹¹).

use hetccl::device::{available, cublas_available, CudaSlice, Device, Stream};
use hetccl_testkit::skip;
use hetccl_trainer::gpu::Kernels;
use hetccl_trainer::gpu_blas::{Blas, Precision};
use hetccl_trainer::ops;

struct Gpu {
    _device: Device,
    stream: Stream,
    k: Kernels,
}

/// The device, or `None` after recording why the test skips.
fn gpu() -> Option<Gpu> {
    if let Err(reason) = available() {
        skip(&reason);
        return None;
    }
    if let Err(reason) = cublas_available() {
        skip(&reason);
        return None;
    }
    let device = Device::open(0).expect("open device 0");
    let stream = device.new_stream().expect("stream");
    let k = Kernels::load(&device).expect("the trainer's kernels are in the fatbin");
    Some(Gpu {
        _device: device,
        stream,
        k,
    })
}

impl Gpu {
    fn up(&self, v: &[f32]) -> CudaSlice<f32> {
        self.stream.upload(v).expect("upload")
    }
    fn down(&self, d: &CudaSlice<f32>) -> Vec<f32> {
        self.stream.download(d).expect("download")
    }
}

/// Uniform values in [lo, hi), reproducible (splitmix64).
fn rand_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

/// |got - want| ≤ bound·scale + 1e-30 everywhere (scale per element).
fn assert_within(what: &str, got: &[f32], want: &[f32], scale: &[f32], bound: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for i in 0..got.len() {
        let (g, w) = (got[i] as f64, want[i] as f64);
        let tol = bound * scale[i] as f64 + 1e-30;
        let err = (g - w).abs();
        assert!(
            err <= tol,
            "{what}[{i}]: GPU {g:e} CPU {w:e}, error {err:e} over {tol:e} (scale {:e})",
            scale[i]
        );
        worst = worst.max(err / tol);
    }
    eprintln!("{what}: worst error {worst:.3} of the tolerance");
}

/// fp32 bound for sums of k products.
fn fp32(k: usize) -> f64 {
    2.0 * k as f64 * 2f64.powi(-24)
}

const TF32: f64 = 1.0 / 512.0;

fn check_matmul_forward(precision: Precision, bound: impl Fn(usize) -> f64) {
    let Some(g) = gpu() else { return };
    let mut blas = Blas::new(&g.stream, precision).unwrap();
    // N, C, OC: none a multiple of 8, 32 or of each other.
    for (n, c, oc) in [(37, 29, 45), (1, 3, 1), (130, 67, 193)] {
        let inp = rand_vec(1, n * c, -1.0, 1.0);
        let w = rand_vec(2, oc * c, -1.0, 1.0);
        let bias = rand_vec(3, oc, -1.0, 1.0);
        for with_bias in [true, false] {
            let b = with_bias.then_some(&bias[..]);
            let mut want = vec![0.0; n * oc];
            ops::matmul_forward(&mut want, &inp, &w, b, n, c, oc);
            let mut scale = vec![0.0; n * oc];
            let babs = abs(&bias);
            ops::matmul_forward(
                &mut scale,
                &abs(&inp),
                &abs(&w),
                with_bias.then_some(&babs[..]),
                n,
                c,
                oc,
            );
            // out starts as garbage: the product must overwrite it
            let mut d_out = g.up(&vec![7.0; n * oc]);
            let d_bias = g.up(&bias);
            blas.matmul_forward(
                &g.stream,
                &mut d_out,
                &g.up(&inp),
                &g.up(&w),
                with_bias.then_some(&d_bias),
                n,
                c,
                oc,
            )
            .unwrap();
            let what = format!("matmul_forward {precision:?} {n}x{c}x{oc} bias {with_bias}");
            assert_within(&what, &g.down(&d_out), &want, &scale, bound(c));
        }
    }
}

#[test]
fn matmul_forward_matches_the_cpu_in_fp32() {
    check_matmul_forward(Precision::Fp32, fp32);
}

#[test]
fn matmul_forward_matches_the_cpu_in_tf32() {
    check_matmul_forward(Precision::Tf32, |_| TF32);
}

#[test]
fn matmul_backward_accumulates_like_the_cpu() {
    let Some(g) = gpu() else { return };
    let blas = Blas::new(&g.stream, Precision::Fp32).unwrap();
    let (n, c, oc) = (53, 31, 70);
    let inp = rand_vec(11, n * c, -1.0, 1.0);
    let w = rand_vec(12, oc * c, -1.0, 1.0);
    let dout = rand_vec(13, n * oc, -1.0, 1.0);
    // non-zero accumulators: backward adds
    let dinp0 = rand_vec(14, n * c, -0.5, 0.5);
    let dw0 = rand_vec(15, oc * c, -0.5, 0.5);
    let db0 = rand_vec(16, oc, -0.5, 0.5);

    let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
    ops::matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &inp, &w, n, c, oc);
    let (mut sinp, mut sw, mut sb) = (abs(&dinp0), abs(&dw0), abs(&db0));
    ops::matmul_backward(
        &mut sinp,
        &mut sw,
        Some(&mut sb),
        &abs(&dout),
        &abs(&inp),
        &abs(&w),
        n,
        c,
        oc,
    );

    let (mut d_dinp, mut d_dw, mut d_db) = (g.up(&dinp0), g.up(&dw0), g.up(&db0));
    blas.matmul_backward(
        &g.stream,
        &g.k,
        &mut d_dinp,
        &mut d_dw,
        Some(&mut d_db),
        &g.up(&dout),
        &g.up(&inp),
        &g.up(&w),
        n,
        c,
        oc,
    )
    .unwrap();
    assert_within(
        "matmul_backward dinp",
        &g.down(&d_dinp),
        &dinp,
        &sinp,
        fp32(oc),
    );
    assert_within("matmul_backward dweight", &g.down(&d_dw), &dw, &sw, fp32(n));
    // bias_backward walks the rows in the CPU's order: bitwise
    let got = g.down(&d_db);
    assert!(
        got.iter().zip(&db).all(|(a, b)| a.to_bits() == b.to_bits()),
        "matmul_backward dbias differs: GPU {got:?} CPU {db:?}"
    );

    // without a bias gradient, dinp and dweight alone
    let (mut d_dinp, mut d_dw) = (g.up(&dinp0), g.up(&dw0));
    blas.matmul_backward(
        &g.stream,
        &g.k,
        &mut d_dinp,
        &mut d_dw,
        None::<&mut CudaSlice<f32>>,
        &g.up(&dout),
        &g.up(&inp),
        &g.up(&w),
        n,
        c,
        oc,
    )
    .unwrap();
    assert_within(
        "matmul_backward dinp (no bias)",
        &g.down(&d_dinp),
        &dinp,
        &sinp,
        fp32(oc),
    );
}

/// The attention's products run batched per head on strided views of qkv (B,T,3C), its
/// softmax carries the scale: against the CPU's per-(b,h) products. Probabilities are at
/// most 1 and the inputs in [-1,1], so an absolute 2e-5 + relative 1e-4 covers the
/// reordered sums (hs = 8 or T = 19 terms of size up to ~3, 2⁻²⁴ each) and the scale
/// applied after the product instead of in it.
#[test]
fn attention_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let blas = Blas::new(&g.stream, Precision::Fp32).unwrap();
    let (b, t, c, nh) = (3, 19, 24, 3);
    let inp = rand_vec(21, b * t * 3 * c, -1.0, 1.0);
    let dout = rand_vec(22, b * t * c, -1.0, 1.0);
    let dinp0 = rand_vec(23, b * t * 3 * c, -0.5, 0.5);
    let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
    ops::attention_forward(&mut out, &mut att, &inp, b, t, c, nh);
    let (mut dinp, mut datt, mut dpre) = (
        dinp0.clone(),
        vec![0.0; b * nh * t * t],
        vec![0.0; b * nh * t * t],
    );
    ops::attention_backward(
        &mut dinp, &mut datt, &mut dpre, &dout, &inp, &att, b, t, c, nh,
    );

    let d_inp = g.up(&inp);
    let (mut d_out, mut d_att) = (
        g.up(&vec![3.0; b * t * c]),
        g.up(&vec![3.0; b * nh * t * t]),
    );
    blas.attention_forward(&g.stream, &g.k, &mut d_out, &mut d_att, &d_inp, b, t, c, nh)
        .unwrap();
    let close = |what: &str, got: &[f32], want: &[f32]| {
        let scale: Vec<f32> = want.iter().map(|w| 1.0 + 5.0 * w.abs()).collect();
        assert_within(what, got, want, &scale, 2e-5);
    };
    close("attention_forward att", &g.down(&d_att), &att);
    close("attention_forward out", &g.down(&d_out), &out);

    let mut d_dinp = g.up(&dinp0);
    let (mut d_datt, mut d_dpre) = (
        g.up(&vec![5.0; b * nh * t * t]),
        g.up(&vec![5.0; b * nh * t * t]),
    );
    blas.attention_backward(
        &g.stream,
        &g.k,
        &mut d_dinp,
        &mut d_datt,
        &mut d_dpre,
        &g.up(&dout),
        &d_inp,
        &d_att,
        b,
        t,
        c,
        nh,
    )
    .unwrap();
    close("attention_backward datt", &g.down(&d_datt), &datt);
    // the CPU's dpreatt leaves the scale to its products; the GPU's carries it
    let scale = 1.0 / ((c / nh) as f32).sqrt();
    let dpre_scaled: Vec<f32> = dpre.iter().map(|x| x * scale).collect();
    close("attention_backward dpreatt", &g.down(&d_dpre), &dpre_scaled);
    close("attention_backward dinp", &g.down(&d_dinp), &dinp);
}

#[test]
fn residual_forward_is_bitwise_and_the_stream_is_checked() {
    let Some(g) = gpu() else { return };
    let blas = Blas::new(&g.stream, Precision::Tf32).unwrap();
    let n = 1001;
    let (a, b) = (rand_vec(31, n, -3.0, 3.0), rand_vec(32, n, -3.0, 3.0));
    let mut want = vec![0.0; n];
    ops::residual_forward(&mut want, &a, &b, n);
    let mut d_out = g.up(&vec![0.0; n]);
    blas.residual_forward(&g.stream, &mut d_out, &g.up(&a), &g.up(&b), n)
        .unwrap();
    let got = g.down(&d_out);
    assert!(
        got.iter()
            .zip(&want)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "residual_forward is not bitwise"
    );

    let other = g._device.new_stream().unwrap();
    let err = blas
        .residual_forward(&other, &mut d_out, &g.up(&a), &g.up(&b), n)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the stream is not the one this cuBLAS handle issues on"),
        "{err}"
    );
    let err = blas
        .residual_forward(&g.stream, &mut d_out, &g.up(&a), &g.up(&b[..10]), n)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("inp2 has 10 elements, needs at least 1001"),
        "{err}"
    );
}
