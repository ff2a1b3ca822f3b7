//! Each rank's trace clock against rank 0's, measured once at init so that
//! `hetccl trace merge` can put every rank on one timeline.
//!
//! Rank 0 serves every other rank in turn, `ROUNDS` round trips each (the
//! exchange of NTP):
//!
//! ```text
//! rank r: t1 = now; send t1 ──▶ rank 0: t2 = now; send t2 ──▶ rank r: t3 = now
//! offset = t2 - (t1 + t3) / 2     (rank 0's clock = r's clock + offset)
//! error  ≤ (t3 - t1) / 2          (wherever in the round trip rank 0 read its clock)
//! ```
//!
//! The round with the shortest trip wins. On one host every process reads the same
//! monotonic clock and the offset only undoes the processes' different trace epochs; the
//! error is then the half trip over shared memory (microseconds; more where ranks
//! outnumber cores and a rank waits for the CPU). Across hosts it is the half trip over
//! TCP, plus the clocks' drift since init (NTP-disciplined clocks drift by well under
//! a millisecond a minute).

use super::trace::now_micros;
use crate::communicator::Communicator;
use crate::error::Result;

/// Round trips per rank.
const ROUNDS: usize = 8;

/// Rank 0's clock minus this rank's, and its bound, in microseconds; (0, 0) on rank 0.
/// Collective: every rank must call it.
pub(crate) fn offset_to_rank0(comm: &Communicator) -> Result<(f64, f64)> {
    if comm.rank() == 0 {
        for r in 1..comm.world_size() {
            for _ in 0..ROUNDS {
                let mut t1 = [0f64];
                comm.recv(&mut t1, r)?;
                comm.send(&[now_micros()], r)?;
            }
        }
        return Ok((0.0, 0.0));
    }
    let mut best = (0.0, f64::INFINITY);
    for _ in 0..ROUNDS {
        let t1 = now_micros();
        comm.send(&[t1], 0)?;
        let mut t2 = [0f64];
        comm.recv(&mut t2, 0)?;
        let t3 = now_micros();
        let error = (t3 - t1) / 2.0;
        if error < best.1 {
            best = (t2[0] - (t1 + t3) / 2.0, error);
        }
    }
    Ok(best)
}
