//! Times an f32 sum all-reduce: `allreduce_time BYTES ITERS`. Start it on every rank
//! (e.g. `scripts/netcluster.sh run --ranks 2,2 -- target/release/examples/allreduce_time
//! 64M 5`); rank 0 prints one line per iteration and a summary:
//!
//! ```text
//! allreduce_time: 67108864 bytes, 4 ranks on 2 nodes, algorithm hier: median T s, min T s, max T s
//! ```
//!
//! (T in seconds to four places; what such runs take now: `docs/PERFORMANCE.md`,
//! simulated cluster.)
//!
//! Every iteration starts after a barrier and counts as long as the slowest rank took
//! (each rank times its own call); the result is checked against its closed form so a
//! fast wrong answer cannot pass as a measurement.

use std::time::Instant;

use hetccl::{Communicator, ReduceOp};

mod common;
fn main() -> hetccl::Result<()> {
    let bytes = common::size(1, 64 << 20);
    let iters: usize = common::number(2, 5);
    let comm = Communicator::init_from_env()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    let count = bytes / 4;
    let mut buf = vec![0f32; count];
    let mut times = Vec::with_capacity(iters);
    // One untimed call: first-touch page faults and TCP slow start are not the subject.
    for it in 0..=iters {
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (rank + i % 3) as f32);
        comm.barrier()?;
        let t0 = Instant::now();
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        let mut dt = [t0.elapsed().as_secs_f64()];
        let want = |i: usize| (n * (n - 1) / 2 + n * (i % 3)) as f32;
        if let Some(i) = (0..count).find(|&i| buf[i] != want(i)) {
            return Err(hetccl::Error::invalid(
                "allreduce_time",
                format!("element {i} is {} instead of {}", buf[i], want(i)),
            ));
        }
        // The slowest rank's time: a rank that leaves the barrier late would
        // otherwise time less than the whole collective.
        comm.all_reduce(&mut dt, ReduceOp::Max)?;
        if it > 0 {
            times.push(dt[0]);
            if rank == 0 {
                println!("iteration {it}: {:.4} s", dt[0]);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    if rank == 0 && !times.is_empty() {
        let algo = comm.config().algo.name();
        println!(
            "allreduce_time: {} bytes, {n} ranks on {} nodes, algorithm {algo}: median {:.4} s, min {:.4} s, max {:.4} s",
            count * 4,
            comm.topology().nodes.len(),
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}
