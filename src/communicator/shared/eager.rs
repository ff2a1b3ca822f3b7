//! The eager algorithm: small all-reduces through two slots of every control page, with
//! no shared buffer needed.
//!
//! The selection sends an all-reduce here when every rank shares one host and it is at
//! most [`crate::algorithm::select::eager_limit`] bytes. Every rank copies its input
//! into an eager slot of its control page with the call in the slot's header, publishes
//! `flag = (s, ARRIVE)`, waits for every peer's flag, checks their headers and reduces
//! all slots in rank order into its output. One flag
//! exchange and one read of each peer's slot, and no exit step: the slots alternate,
//! and a rank reuses a slot only after every peer has published the eager call that
//! followed the slot's last use, which it does only after reading that slot.

use std::sync::atomic::{AtomicBool, Ordering};

use super::control::{load_call, stated, store_call, NodeCtl, Waits, ARRIVE, EAGER_BYTES, NONE};
use crate::algorithm::call::{self, NO_ROOT};
use crate::algorithm::executor::{Buffers, ExecCtx};
use crate::error::{Error, Result};
use crate::reduce;

/// Runs a small all-reduce through the eager slots (see the module docs).
pub(super) fn all_reduce(
    node: &NodeCtl,
    bufs: &Buffers,
    ctx: &ExecCtx,
    cancel: &AtomicBool,
) -> Result<()> {
    let me = node.me;
    let n = node.n();
    let bytes = bufs.output_len;
    if bytes > EAGER_BYTES || bufs.input_len != bytes {
        return Err(Error::invalid(
            "all_reduce",
            format!("eager path given {} -> {bytes} bytes", bufs.input_len),
        ));
    }
    let parity = (node.eager_calls.fetch_add(1, Ordering::Relaxed) & 1) as usize;
    let mine = stated(ctx, NO_ROOT);
    // The call line too, so a peer that took the shared-buffer path instead can say
    // what this rank runs.
    let line = &node.page(me).call;
    store_call(&line.call, &mine);
    line.in_idx.store(NONE, Ordering::Relaxed);
    line.out_idx.store(NONE, Ordering::Relaxed);
    let (head, data) = node.eager_slot(me, parity);
    // SAFETY: the slot holds EAGER_BYTES >= bytes; no peer reads it until the flag
    // below says so, and every peer has finished with this slot's previous call
    // (module docs).
    unsafe { std::ptr::copy_nonoverlapping(bufs.input, data, bytes) };
    store_call(&head.call, &mine);
    node.publish(ctx.seq, ARRIVE);

    let waits = Waits {
        node,
        ctx,
        cancel,
        eager: true,
    };
    for l in (0..n).filter(|&l| l != me) {
        waits.wait(l, ARRIVE, "to start the collective")?;
        let (h, _) = node.eager_slot(l, parity);
        let peer = waits.peer(l);
        let engine = call::Engine::Eager { bytes };
        call::check(ctx.rank, peer, &mine, &load_call(&h.call), engine)
            .map_err(|detail| ctx.mismatch(peer, detail))?;
    }
    crate::dispatch_dtype!(ctx.dtype, T => {
        let count = ctx.count as usize;
        // SAFETY: the output holds `count` elements and belongs to this call; every
        // slot holds `count` elements that stay unchanged until this rank publishes
        // its next eager call (module docs), and no slot overlaps the output.
        let out = unsafe { std::slice::from_raw_parts_mut(bufs.output.cast::<T>(), count) };
        let src = |l: usize| unsafe {
            std::slice::from_raw_parts(node.eager_slot(l, parity).1.cast::<T>().cast_const(), count)
        };
        if n == 1 {
            out.copy_from_slice(src(0));
        } else {
            reduce::reduce_from(ctx.redop, out, src(0), src(1));
            for l in 2..n {
                reduce::reduce_inplace(ctx.redop, out, src(l));
            }
        }
        reduce::reduce_finalize(ctx.redop, out, ctx.world_size);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::select::eager_limit;
    use crate::communicator::shared::control::flag_value;
    use crate::communicator::shared::testing::{attached, last_direct, secs};
    use crate::communicator::testing::on_all;
    use crate::config::AlgoChoice;
    use crate::dtype::ReduceOp;

    #[test]
    fn small_all_reduce_goes_through_the_eager_slots_with_private_buffers() {
        for n in [2usize, 3, 4] {
            let comms = attached(n, secs(20), AlgoChoice::Auto);
            let ops = ReduceOp::ALL;
            // 20 rounds reuse both slots many times; the largest count fills a slot.
            let counts = [1usize, 5, eager_limit(n) / 16, eager_limit(n) / 8];
            let outs = on_all(&comms, |c| {
                let r = c.rank() as f64;
                let node = c.shared.ctl.get().unwrap();
                let mut res = Vec::new();
                for round in 0..20 {
                    for &count in &counts {
                        for op in ops {
                            let x: Vec<f64> = (0..count)
                                .map(|i| r * 7.0 + (i % 11) as f64 + round as f64)
                                .collect();
                            let calls = node.eager_calls.load(Ordering::Relaxed);
                            let out = if round % 2 == 0 {
                                let mut y = x.clone();
                                c.all_reduce(&mut y, op).unwrap();
                                y
                            } else {
                                let mut y = vec![0.0; count];
                                c.all_reduce_into(&x, &mut y, op).unwrap();
                                y
                            };
                            assert_eq!(node.eager_calls.load(Ordering::Relaxed), calls + 1);
                            assert_eq!(
                                last_direct(c),
                                flag_value(c.seq.load(Ordering::Relaxed) - 1, ARRIVE)
                            );
                            res.push(out);
                        }
                    }
                }
                res
            });
            let mut k = 0;
            for round in 0..20 {
                for &count in &counts {
                    for op in ops {
                        for (r, o) in outs.iter().enumerate() {
                            for i in [0, count / 2, count - 1] {
                                let v = |q: usize| q as f64 * 7.0 + (i % 11) as f64 + round as f64;
                                let fold =
                                    |f: fn(f64, f64) -> f64| (1..n).fold(v(0), |a, q| f(a, v(q)));
                                let want = match op {
                                    ReduceOp::Sum => fold(|a, b| a + b),
                                    ReduceOp::Prod => fold(|a, b| a * b),
                                    ReduceOp::Max => fold(f64::max),
                                    ReduceOp::Min => fold(f64::min),
                                    ReduceOp::Avg => fold(|a, b| a + b) / n as f64,
                                };
                                assert_eq!(
                                    o[k][i], want,
                                    "n {n} rank {r} round {round} count {count} {op} [{i}]"
                                );
                            }
                        }
                        k += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn eager_sums_are_bitwise_equal_everywhere_and_forced_algorithms_skip_them() {
        // Values whose f32 sum depends on the order: the eager path folds in rank order.
        let val = |r: usize, i: usize| [1e8f32, 1.0, -1e8, 0.5][r] * (1.0 + i as f32 * 1e-3);
        let count = 100;
        let comms = attached(4, secs(20), AlgoChoice::Auto);
        let outs = on_all(&comms, |c| {
            let mut b: Vec<f32> = (0..count).map(|i| val(c.rank(), i)).collect();
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
            b
        });
        for i in [0usize, 1, 99] {
            let want = ((val(0, i) + val(1, i)) + val(2, i)) + val(3, i);
            for o in &outs {
                assert_eq!(o[i].to_bits(), want.to_bits(), "element {i}");
            }
        }
        // A forced ring is a ring, however small the call; one byte over the limit is
        // no eager call either.
        for (algo, count) in [
            (AlgoChoice::Ring, 4),
            (AlgoChoice::Auto, eager_limit(2) + 1),
        ] {
            let comms = attached(2, secs(20), algo);
            let calls = on_all(&comms, |c| {
                let mut b = vec![1u8; count];
                c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
                assert!(b.iter().all(|&x| x == 2));
                c.shared
                    .ctl
                    .get()
                    .unwrap()
                    .eager_calls
                    .load(Ordering::Relaxed)
            });
            assert_eq!(calls, [0, 0], "{algo:?} {count}");
        }
    }

    #[test]
    fn eager_calls_that_disagree_are_a_mismatch() {
        // Both small, different counts: each rank names the other's call.
        let comms = attached(2, secs(20), AlgoChoice::Auto);
        let errs = on_all(&comms, |c| {
            let mut b = vec![1.0f32; 10 + 10 * c.rank()];
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert_eq!(
            errs[0],
            "rank 0: all_reduce #0 does not match what peer 1 sent: expected all_reduce #0 of \
             10 x f32 (sum op), peer runs all_reduce #0 of 20 x f32 (sum op)"
        );
        assert_eq!(
            errs[1],
            "rank 1: all_reduce #0 does not match what peer 0 sent: expected all_reduce #0 of \
             20 x f32 (sum op), peer runs all_reduce #0 of 10 x f32 (sum op)"
        );
        // One small, one large: the small one learns that its peer went over links.
        let comms = attached(2, secs(20), AlgoChoice::Auto);
        let errs = on_all(&comms, |c| {
            let mut b = vec![1.0f32; if c.rank() == 0 { 10 } else { 100_000 }];
            c.all_reduce(&mut b, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert!(
            errs[0].contains(
                "rank 0: all_reduce #0 does not match what peer 1 sent: rank 0 runs it as a \
                 small all_reduce through shared memory, peer 1 runs all_reduce #0 of 100000 \
                 x f32 (sum op) over links (the ranks disagree on the count, the dtype or the \
                 collective)"
            ),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("rank 1: peer 0 is gone during all_reduce #0"),
            "{errs:?}"
        );
    }
}
