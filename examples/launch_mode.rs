//! What sets a launch's speed over shared memory: the buffers' pages, or where the
//! ranks run. `launch_mode BYTES ROUNDS ITERS`, started on every rank (`hetccl run -n 2
//! -- target/release/examples/launch_mode 64 4 200`): every even round allocates fresh
//! input and output buffers (new physical pages; the old ones stay allocated), every
//! odd round reuses round 0's, as a control. Each round runs ITERS out-of-place f32 sum
//! all-reduces and rank 0 prints the median time and busbw, and the core each rank ran
//! on at the round's end:
//!
//! ```text
//! round 0 fresh busbw 0.43 GB/s median 0.3 us cpus [0.0, 1.0] in 0x55c62b27c4c0
//! ```
//!
//! On the 2-core machine of `docs/PERFORMANCE.md` fresh and reused buffers ran alike,
//! while launches whose two ranks shared one core ran 20× slower at 64 B (and half as
//! fast at 1 MiB) for all their rounds: that is what `HETCCL_SPREAD` removes.

use std::time::Instant;

use hetccl::{Communicator, ReduceOp};

mod common;
fn main() -> hetccl::Result<()> {
    let bytes = common::size(1, 1 << 20);
    let rounds: usize = common::number(2, 8);
    let iters: usize = common::number(3, 200);
    let comm = Communicator::init_from_env()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    let count = bytes / 4;
    let mut kept: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    for round in 0..rounds {
        let same = round % 2 == 1;
        if !same || kept.is_empty() {
            let input: Vec<f32> = (0..count).map(|i| (rank + i % 3) as f32).collect();
            let output = vec![1f32; count];
            kept.push((input, output));
        }
        let idx = if same { 0 } else { kept.len() - 1 };
        let (input, output) = &mut kept[idx];
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            comm.barrier()?;
            let t0 = Instant::now();
            comm.all_reduce_into(input, output, ReduceOp::Sum)?;
            let mut dt = [t0.elapsed().as_secs_f64()];
            comm.all_reduce(&mut dt, ReduceOp::Max)?;
            times.push(dt[0]);
        }
        times.sort_by(f64::total_cmp);
        let med = times[iters / 2];
        let busbw = 2.0 * (n - 1) as f64 / n as f64 * bytes as f64 / med / 1e9;
        let cpu = unsafe { libc::sched_getcpu() };
        let mut cpus = vec![0f64; n];
        cpus[rank] = cpu as f64;
        comm.all_reduce(&mut cpus, ReduceOp::Sum)?;
        if rank == 0 {
            println!(
                "round {round} {} busbw {busbw:.2} GB/s median {:.1} us cpus {:?} in {:p}",
                if same { "same " } else { "fresh" },
                med * 1e6,
                cpus,
                input.as_ptr()
            );
        }
    }
    Ok(())
}
