//! Every kernel of kernels/bert.cu against its CPU twin (trainer/src/ops.rs, optim.rs) on
//! random inputs at sizes that are not multiples of the warp (32) or block (256): bitwise
//! where the kernel keeps the CPU's order of operations, else within the tolerance stated
//! at the test. Skipped, with the reason, without a CUDA driver or device.

use hetccl::device::{available, CudaSlice, Device, Stream};
use hetccl_testkit::skip;
use hetccl_trainer::gpu::{scaled_norm_chunks, Kernels};
use hetccl_trainer::ops;
use hetccl_trainer::optim::{self, AdamWConfig, NORM_CHUNK};

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
    fn up<T: hetccl::device::DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.upload(v).expect("upload")
    }
    fn down<T: hetccl::device::DeviceRepr + Default + Clone>(&self, d: &CudaSlice<T>) -> Vec<T> {
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

fn rand_ids(seed: u64, n: usize, below: u32) -> Vec<u32> {
    rand_vec(seed, n, 0.0, 1.0)
        .iter()
        .map(|&u| ((u * below as f32) as u32).min(below - 1))
        .collect()
}

/// Bit for bit (every value finite here, so bits equal means values equal).
fn assert_bitwise(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ, first at {}: GPU {:e} CPU {:e}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

/// |got - want| ≤ abs + rel·|want| everywhere; reports the largest error.
fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0.0f64, 0usize);
    for i in 0..got.len() {
        let (g, w) = (got[i] as f64, want[i] as f64);
        let err = (g - w).abs();
        assert!(
            err <= abs + rel * w.abs(),
            "{what}[{i}]: GPU {g:e} CPU {w:e}, error {err:e} over {abs:e} + {rel:e}·|CPU|"
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("{what}: max error {:e} at {}", worst.0, worst.1);
}

#[test]
fn bias_gelu_forward_and_backward_are_bitwise() {
    let Some(g) = gpu() else { return };
    let (n, oc) = (37, 203);
    let inp = rand_vec(1, n * oc, -4.0, 4.0);
    let bias = rand_vec(2, oc, -1.0, 1.0);
    let dout = rand_vec(3, n * oc, -1.0, 1.0);
    let dbias0 = rand_vec(4, oc, -0.5, 0.5);

    let (mut out, mut pre) = (vec![0.0; n * oc], inp.clone());
    ops::bias_gelu_forward(&mut out, &mut pre, &bias, n, oc);
    let (mut d_out, mut d_pre) = (g.up(&vec![0.0f32; n * oc]), g.up(&inp));
    g.k.bias_gelu_forward(&g.stream, &mut d_out, &mut d_pre, &g.up(&bias), n, oc)
        .unwrap();
    assert_bitwise("bias_gelu_forward out", &g.down(&d_out), &out);
    assert_bitwise("bias_gelu_forward inp + bias", &g.down(&d_pre), &pre);

    let (mut dinp, mut dbias) = (vec![0.0; n * oc], dbias0.clone());
    ops::bias_gelu_backward(&mut dinp, &mut dbias, &pre, &dout, n, oc);
    let (mut d_dinp, mut d_dbias) = (g.up(&vec![0.0f32; n * oc]), g.up(&dbias0));
    g.k.bias_gelu_backward(
        &g.stream,
        &mut d_dinp,
        &mut d_dbias,
        &d_pre,
        &g.up(&dout),
        n,
        oc,
    )
    .unwrap();
    assert_bitwise("bias_gelu_backward dinp", &g.down(&d_dinp), &dinp);
    assert_bitwise("bias_gelu_backward dbias", &g.down(&d_dbias), &dbias);
}

/// Tolerances: the row statistics are a warp's sums, not the CPU's sequential ones, so
/// out, mean and rstd agree to a few f32 roundings of sums of ~100 terms of size ~1
/// (5e-6 absolute, 1e-5 relative for rstd); dinp likewise (2e-5 absolute on values of
/// size ~1). dweight and dbias walk the rows in the CPU's order from the same mean and
/// rstd: bitwise.
#[test]
fn layernorm_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    for (n, c) in [(37, 77), (5, 300)] {
        let inp = rand_vec(10, n * c, -2.0, 3.0);
        let weight = rand_vec(11, c, 0.5, 1.5);
        let bias = rand_vec(12, c, -0.5, 0.5);
        let dout = rand_vec(13, n * c, -1.0, 1.0);
        let dw0 = rand_vec(14, c, -0.1, 0.1);
        let db0 = rand_vec(15, c, -0.1, 0.1);
        let dinp0 = rand_vec(16, n * c, -0.1, 0.1);

        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        ops::layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &weight, &bias, n, c);
        let (mut d_out, mut d_mean, mut d_rstd) = (
            g.up(&vec![0.0f32; n * c]),
            g.up(&vec![0.0f32; n]),
            g.up(&vec![0.0f32; n]),
        );
        let (d_inp, d_w) = (g.up(&inp), g.up(&weight));
        g.k.layernorm_forward(
            &g.stream,
            &mut d_out,
            &mut d_mean,
            &mut d_rstd,
            &d_inp,
            &d_w,
            &g.up(&bias),
            n,
            c,
        )
        .unwrap();
        assert_close("layernorm_forward mean", &g.down(&d_mean), &mean, 5e-6, 0.0);
        assert_close("layernorm_forward rstd", &g.down(&d_rstd), &rstd, 0.0, 1e-5);
        assert_close("layernorm_forward out", &g.down(&d_out), &out, 5e-6, 1e-5);

        let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
        ops::layernorm_backward(
            &mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, n, c,
        );
        let (mut d_dinp, mut d_dw, mut d_db) = (g.up(&dinp0), g.up(&dw0), g.up(&db0));
        // the CPU's statistics, so the parameter sums see the same inputs
        let (d_mean, d_rstd) = (g.up(&mean), g.up(&rstd));
        g.k.layernorm_backward(
            &g.stream,
            &mut d_dinp,
            &mut d_dw,
            &mut d_db,
            &g.up(&dout),
            &d_inp,
            &d_w,
            &d_mean,
            &d_rstd,
            n,
            c,
        )
        .unwrap();
        assert_close(
            "layernorm_backward dinp",
            &g.down(&d_dinp),
            &dinp,
            2e-5,
            1e-5,
        );
        assert_bitwise("layernorm_backward dweight", &g.down(&d_dw), &dw);
        assert_bitwise("layernorm_backward dbias", &g.down(&d_db), &db);
    }
}

#[test]
fn attention_softmax_is_bitwise() {
    let Some(g) = gpu() else { return };
    // rows of 13 (under a warp, under 8 lanes twice) and 70 (two warps' strides, a tail
    // of 6 after the 8-lane part)
    for (n, t, scale) in [
        (3 * 2 * 13, 13, 0.125f32),
        (2 * 3 * 70, 70, 1.0 / 8f32.sqrt()),
    ] {
        let pre = rand_vec(20, n * t, -6.0, 6.0);
        let datt = rand_vec(21, n * t, -1.0, 1.0);
        let mut att = pre.clone();
        ops::softmax_forward(&mut att, scale, n, t);
        let mut d_att = g.up(&pre);
        g.k.softmax_forward(&g.stream, &mut d_att, scale, n, t)
            .unwrap();
        assert_bitwise("softmax_forward", &g.down(&d_att), &att);

        let mut dpre = vec![0.0; n * t];
        ops::softmax_backward(&mut dpre, &datt, &att, scale, n, t);
        let mut d_dpre = g.up(&vec![7.0f32; n * t]); // overwritten
        g.k.softmax_backward(&g.stream, &mut d_dpre, &g.up(&datt), &d_att, scale, n, t)
            .unwrap();
        assert_bitwise("softmax_backward", &g.down(&d_dpre), &dpre);
    }
}

#[test]
fn embeddings_forward_and_deterministic_backward_are_bitwise() {
    let Some(g) = gpu() else { return };
    // V = 53 for many repeated ids (the backward's order matters); more positions than T.
    let (b, t, c, v, p) = (3, 17, 77, 53, 19);
    let ids = rand_ids(30, b * t, v as u32);
    let types = rand_ids(31, b * t, 2);
    let wte = rand_vec(32, v * c, -1.0, 1.0);
    let wpe = rand_vec(33, p * c, -1.0, 1.0);
    let wtt = rand_vec(34, 2 * c, -1.0, 1.0);
    let dout = rand_vec(35, b * t * c, -1.0, 1.0);
    let (dwte0, dwpe0, dwtt0) = (
        rand_vec(36, v * c, -0.1, 0.1),
        rand_vec(37, p * c, -0.1, 0.1),
        rand_vec(38, 2 * c, -0.1, 0.1),
    );

    let mut out = vec![0.0; b * t * c];
    ops::encoder_forward(&mut out, &ids, &types, &wte, &wpe, &wtt, b, t, c);
    let (d_ids, d_types) = (g.up(&ids), g.up(&types));
    let mut d_out = g.up(&vec![0.0f32; b * t * c]);
    // SAFETY: ids < v, types < 2: rows of their tables.
    unsafe {
        g.k.encoder_forward(
            &g.stream,
            &mut d_out,
            &d_ids,
            &d_types,
            &g.up(&wte),
            &g.up(&wpe),
            &g.up(&wtt),
            b,
            t,
            c,
        )
    }
    .unwrap();
    assert_bitwise("encoder_forward", &g.down(&d_out), &out);

    let (mut dwte, mut dwpe, mut dwtt) = (dwte0.clone(), dwpe0.clone(), dwtt0.clone());
    ops::encoder_backward(
        &mut dwte, &mut dwpe, &mut dwtt, &dout, &ids, &types, b, t, c,
    );
    let (mut d_wte, mut d_wpe, mut d_wtt) = (g.up(&dwte0), g.up(&dwpe0), g.up(&dwtt0));
    // SAFETY: as above.
    unsafe {
        g.k.encoder_backward(
            &g.stream,
            &mut d_wte,
            &mut d_wpe,
            &mut d_wtt,
            &g.up(&dout),
            &d_ids,
            &d_types,
            b,
            t,
            c,
        )
    }
    .unwrap();
    assert_bitwise("encoder_backward dwte", &g.down(&d_wte), &dwte);
    assert_bitwise("encoder_backward dwpe", &g.down(&d_wpe), &dwpe);
    assert_bitwise("encoder_backward dwtt", &g.down(&d_wtt), &dwtt);
}

#[test]
fn masked_rows_gather_and_scatter_are_bitwise() {
    let Some(g) = gpu() else { return };
    let (n, m, c) = (51, 13, 77);
    let inp = rand_vec(40, n * c, -1.0, 1.0);
    let dout = rand_vec(41, m * c, -1.0, 1.0);
    let dinp0 = rand_vec(42, n * c, -0.1, 0.1);
    // with repeats, so the scatter's order matters
    let rows32 = rand_ids(43, m, 9);
    let rows: Vec<usize> = rows32.iter().map(|&r| r as usize * 5 + 1).collect();
    let rows32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();

    let mut out = vec![0.0; m * c];
    ops::gather_rows(&mut out, &inp, &rows, c);
    let d_rows = g.up(&rows32);
    let mut d_out = g.up(&vec![0.0f32; m * c]);
    // SAFETY: every row is below n = 51 (at most 8·5 + 1).
    unsafe {
        g.k.gather_rows(&g.stream, &mut d_out, &g.up(&inp), &d_rows, c)
    }
    .unwrap();
    assert_bitwise("gather_rows", &g.down(&d_out), &out);

    let mut dinp = dinp0.clone();
    ops::scatter_add_rows(&mut dinp, &dout, &rows, c);
    let mut d_dinp = g.up(&dinp0);
    // SAFETY: as above.
    unsafe {
        g.k.scatter_add_rows(&g.stream, &mut d_dinp, &g.up(&dout), &d_rows, c)
    }
    .unwrap();
    assert_bitwise("scatter_add_rows", &g.down(&d_dinp), &dinp);
}

/// Tolerances: the f64 log-sum-exp is a block tree, not the CPU's 8 lanes, so the sum
/// agrees to f64 rounding; the loss (≈ ln V ≈ 7) then to one f32 ulp (4.8e-7 there: 1e-6
/// stated), and 1/sum, hence each probability and gradient, to one f32 ulp (2.5e-7
/// relative stated, plus 1e-12 for gradients that round to almost nothing).
#[test]
fn fused_cross_entropy_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let (n, v) = (13, 1001);
    let mut logits = rand_vec(50, n * v, -3.0, 3.0);
    // one confident row, as the trained model makes them
    logits[4 * v + 7] = 20.0;
    let targets = {
        let mut t = rand_ids(51, n, v as u32);
        t[4] = 7;
        t
    };
    let dlosses = rand_vec(52, n, 0.5, 1.5);

    let (mut losses, mut grad) = (vec![0.0; n], logits.clone());
    ops::crossentropy_fused(&mut losses, &mut grad, &dlosses, &targets, n, v);
    let (mut d_losses, mut d_logits) = (g.up(&vec![0.0f32; n]), g.up(&logits));
    // SAFETY: every target < v.
    unsafe {
        g.k.crossentropy_fused(
            &g.stream,
            &mut d_losses,
            &mut d_logits,
            &g.up(&dlosses),
            &g.up(&targets),
            n,
            v,
        )
    }
    .unwrap();
    assert_close(
        "crossentropy_fused losses",
        &g.down(&d_losses),
        &losses,
        1e-6,
        0.0,
    );
    assert_close(
        "crossentropy_fused dlogits",
        &g.down(&d_logits),
        &grad,
        1e-12,
        2.5e-7,
    );
}

#[test]
fn bias_gradient_is_bitwise() {
    let Some(g) = gpu() else { return };
    let (n, oc) = (299, 203);
    let dout = rand_vec(60, n * oc, -1.0, 1.0);
    let db0 = rand_vec(61, oc, -1.0, 1.0);
    let mut db = db0.clone();
    ops::bias_backward(&mut db, &dout, n, oc);
    let mut d_db = g.up(&db0);
    g.k.bias_backward(&g.stream, &mut d_db, &g.up(&dout), n, oc)
        .unwrap();
    assert_bitwise("bias_backward", &g.down(&d_db), &db);
}

#[test]
fn adamw_and_the_gradient_norm_are_bitwise() {
    let Some(g) = gpu() else { return };
    let n = 2 * NORM_CHUNK + 10_007;
    let grads = rand_vec(70, n, -3.0, 3.0);
    let params = rand_vec(71, n, -1.0, 1.0);
    let m0 = rand_vec(72, n, -0.1, 0.1);
    let v0 = rand_vec(73, n, 0.0, 0.1);
    let inv = 1.0 / 37.0;

    let norm = optim::scaled_norm(&grads, inv);
    let d_grads = g.up(&grads);
    let mut d_partial = g.up(&vec![0.0f64; scaled_norm_chunks(n)]);
    let mut d_norm = g.up(&[0.0f32]);
    g.k.scaled_norm(&g.stream, &d_grads, inv, &mut d_partial, &mut d_norm)
        .unwrap();
    assert_bitwise("scaled_norm", &g.down(&d_norm), &[norm]);

    let cfg = AdamWConfig::default();
    let clip = optim::clip_factor(norm, 0.5);
    assert!(clip < 1.0, "the test clips: norm {norm}");
    let (bc1, bc2) = (1.0 - cfg.beta1.powi(3), 1.0 - cfg.beta2.powi(3));
    for wd in [cfg.weight_decay, 0.0] {
        let (mut p, mut gr, mut m, mut v) = (params.clone(), grads.clone(), m0.clone(), v0.clone());
        optim::adamw_update(
            &mut p, &mut gr, &mut m, &mut v, cfg, bc1, bc2, 1e-3, wd, inv, clip,
        );
        let (mut dp, mut dg, mut dm, mut dv) = (g.up(&params), g.up(&grads), g.up(&m0), g.up(&v0));
        g.k.adamw_update(
            &g.stream, &mut dp, &mut dg, &mut dm, &mut dv, cfg, bc1, bc2, 1e-3, wd, inv, clip,
        )
        .unwrap();
        assert_bitwise("adamw_update params", &g.down(&dp), &p);
        assert_bitwise("adamw_update m", &g.down(&dm), &m);
        assert_bitwise("adamw_update v", &g.down(&dv), &v);
        assert!(g.down(&dg).iter().all(|&x| x == 0.0), "gradients zeroed");
    }
}
