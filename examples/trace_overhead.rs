//! `trace_overhead BYTES ITERS`: ITERS f32 sum all-reduces of BYTES and nothing else, so
//! that an instruction count of the calls (`scripts/trace-overhead.sh`, callgrind)
//! holds the collectives and what observes them, with no timing or checking around
//! them. Start it on every rank, e.g. `hetccl run -n 4 -- trace_overhead 1M 8`.

use hetccl::{Communicator, ReduceOp};

mod common;
fn main() -> hetccl::Result<()> {
    let bytes = common::size(1, 1 << 20);
    let iters: usize = common::number(2, 8);
    let comm = Communicator::init_from_env()?;
    let mut buf = vec![1f32; bytes / 4];
    for _ in 0..iters {
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
    }
    // Every rank added the same values: a wrong sum would make the count meaningless.
    let want = (comm.world_size() as f32).powi(iters as i32);
    if buf[0] != want {
        return Err(hetccl::Error::invalid(
            "trace_overhead",
            format!("element 0 is {}, expected {want}", buf[0]),
        ));
    }
    Ok(())
}
