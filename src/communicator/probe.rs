//! Runs the start-up link probe ([`crate::topology::probe`]) over the communicator's
//! own send/recv, and installs the merged figures in its topology.

use std::time::{Duration, Instant};

use super::Communicator;
use crate::algorithm::tuning::LinkModel;
use crate::dtype::ReduceOp;
use crate::error::Result;
use crate::topology::probe::{
    self, BIG_BYTES, REPEAT_BELOW, SMALL_BYTES, SMALL_ROUNDS, STOP_AFTER, WARMUP_BYTES,
};
use crate::topology::{distance, LinkPerf, Topology};
use crate::transport::Link;

/// Whether links on a host whose ranks share its CPUs start with streaming stores, from
/// `far` of `of` CPU pairs far apart. A link there joins a far pair some share of the
/// time; ordinary stores cost about 4× streaming ones across dies and streaming costs
/// about 2× ordinary near, so streaming wins above a third.
fn far_apart(far: usize, of: usize) -> bool {
    3 * far > of
}

impl Communicator {
    /// Measures every link in [`probe::probe_order`] and returns the figures of the
    /// pairs this rank drove (it is the lower rank of each). Collective: every rank
    /// calls it at the same point.
    pub(crate) fn probe_links(&self) -> Result<Vec<((usize, usize), LinkPerf)>> {
        let me = self.rank;
        let order = probe::probe_order(&self.topo);
        let mut small = [0u8; SMALL_BYTES];
        // Written once here so no page faults land inside a timed transfer.
        let mut big = vec![1u8; BIG_BYTES[BIG_BYTES.len() - 1]];
        let mut out = Vec::new();
        for &(a, b) in order.iter().filter(|&&(a, b)| a == me || b == me) {
            if a == me {
                let mut rtts = Vec::with_capacity(SMALL_ROUNDS);
                for _ in 0..SMALL_ROUNDS {
                    let t0 = Instant::now();
                    self.send(&small, b)?;
                    self.recv(&mut small, b)?;
                    rtts.push(t0.elapsed());
                }
                let rtt = probe::fastest(&rtts);
                let mut timed = |size: usize| -> Result<Duration> {
                    self.send(&[size as u64], b)?;
                    let t0 = Instant::now();
                    self.send(&big[..size], b)?;
                    self.recv(&mut small, b)?;
                    Ok(t0.elapsed())
                };
                // Untimed: a fresh TCP connection starts with a small congestion window.
                timed(WARMUP_BYTES)?;
                let mut last = (BIG_BYTES[0], Duration::ZERO);
                for &size in &BIG_BYTES {
                    last = (size, timed(size)?);
                    if last.1 >= STOP_AFTER {
                        break;
                    }
                }
                // A short measurement once more, keeping the faster: a rank descheduled
                // mid-transfer on a busy host should not make a link look slow. Long
                // ones (slow links) are not worth the time.
                if last.1 < REPEAT_BELOW {
                    last.1 = last.1.min(timed(last.0)?);
                }
                self.send(&[0u64], b)?;
                let perf = probe::estimate(rtt, last.0, last.1);
                tracing::debug!(
                    rank = me,
                    peer = b,
                    bytes = last.0,
                    "probe: {:.1} us, {:.3} GB/s",
                    perf.latency_ns as f64 / 1e3,
                    perf.bandwidth() / 1e9
                );
                out.push(((a, b), perf));
            } else {
                for _ in 0..SMALL_ROUNDS {
                    self.recv(&mut small, a)?;
                    self.send(&small, a)?;
                }
                loop {
                    let mut size = [0u64];
                    self.recv(&mut size, a)?;
                    let size = size[0] as usize;
                    if size == 0 || size > big.len() {
                        break;
                    }
                    self.recv(&mut big[..size], a)?;
                    self.send(&small, a)?;
                }
            }
        }
        Ok(out)
    }

    /// Probes the links and merges every rank's figures into this communicator's
    /// topology, so all ranks hold the same one. Collective.
    pub(crate) fn measure_topology(&mut self) -> Result<()> {
        let started = Instant::now();
        let order = probe::probe_order(&self.topo);
        let mine = self.probe_links()?;
        let mut merged = probe::encode(&order, &mine);
        self.all_reduce(&mut merged, ReduceOp::Max)?;
        let mut topo = self.topo.clone();
        probe::apply(&mut topo, &order, &merged);
        self.set_topology(topo);
        self.end_probe();
        self.restart_numbering();
        if self.rank == 0 {
            tracing::info!(
                rank = self.rank,
                "probed {} links in {:.0} ms",
                order.len(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(())
    }

    /// Lets every link measure what it wants to know before its first message
    /// ([`crate::transport::Link::probe_at_start`]), each rank in ascending peer order.
    /// Collective. Not where the host runs more ranks than CPUs: the two ends of a link
    /// take turns on the CPUs there, and a probe of how far apart two cores are means
    /// nothing ([`Communicator::start_links_on_shared_cpus`] instead).
    pub(crate) fn probe_links_at_start(&self) {
        if self.topo.oversubscribed(self.topo.node_of[self.rank]) {
            return;
        }
        self.each_link(|l| l.probe_at_start());
    }

    /// Where a host runs more ranks than CPUs, its first rank measures how far apart
    /// the CPUs are ([`distance::far_pairs`]) and every link of the host starts from
    /// that ([`crate::transport::Link::start_on_shared_cpus`]). Collective where some
    /// host does (the others wait in the exchange of the verdicts); nothing elsewhere,
    /// and nothing without shared-memory links.
    pub(crate) fn start_links_on_shared_cpus(&self) -> Result<()> {
        let nodes = self.topo.nodes.len();
        if self.cfg.shm_disable || !(0..nodes).any(|k| self.topo.oversubscribed(k)) {
            return Ok(());
        }
        let node = self.topo.node_of[self.rank];
        let shared = self.topo.oversubscribed(node);
        // Per node: 0 no figure, 1 near, 2 far apart.
        let mut verdict = vec![0u64; nodes];
        if shared && self.topo.nodes[node][0] == self.rank {
            if let Some((far, of)) = distance::far_pairs() {
                verdict[node] = if far_apart(far, of) { 2 } else { 1 };
                tracing::debug!(
                    rank = self.rank,
                    far,
                    of,
                    "CPU probe: {far} of {of} CPU pairs far apart"
                );
            }
        }
        self.all_reduce(&mut verdict, ReduceOp::Max)?;
        if shared && verdict[node] != 0 {
            self.each_link(|l| l.start_on_shared_cpus(verdict[node] == 2));
        }
        Ok(())
    }

    /// Lets every link forget what the probe's traffic taught it.
    fn end_probe(&self) {
        self.each_link(|l| l.end_probe());
    }

    /// Calls `f` on every link of this rank, in peer order.
    fn each_link(&self, mut f: impl FnMut(&mut dyn Link)) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        for l in p.links.iter_mut().flatten() {
            f(l.as_mut());
        }
    }

    /// Replaces the topology and what is derived from it. Plans made so far are
    /// dropped: they may have been chosen from other figures.
    pub(crate) fn set_topology(&mut self, topo: Topology) {
        self.model = LinkModel::of(&topo);
        self.topo = topo;
        self.plans
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::far_apart;

    #[test]
    fn links_stream_where_more_than_a_third_of_the_cpu_pairs_are_far() {
        assert!(far_apart(1, 1));
        assert!(!far_apart(0, 1));
        assert!(!far_apart(1, 3));
        assert!(far_apart(2, 5));
        assert!(!far_apart(5, 15));
        assert!(far_apart(6, 15));
    }
}
