//! `hetcclCommGetMetrics`: a communicator's counters ([`crate::observe::Metrics`]) as
//! one plain C struct.

use super::handle;
use super::status::{guard, hetcclResult_t};
use super::{hetcclComm_t, out};
use crate::observe::{LinkClass, Metrics, Phase};

/// The counters of `hetcclCommGetMetrics`; every field counts from the communicator's
/// initialisation. Bytes are payload bytes; times are nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct hetcclMetrics_t {
    /// Calls run, failed ones included.
    pub calls: u64,
    /// Of them, failed.
    pub failed_calls: u64,
    /// Of them, run on shared memory without links (eager slots, shared buffers).
    pub shared_calls: u64,
    /// Payload bytes of those.
    pub shared_bytes: u64,
    /// Bytes sent over shared-memory links.
    pub bytes_sent_shm: u64,
    /// Bytes sent over TCP links.
    pub bytes_sent_tcp: u64,
    /// Bytes received over shared-memory links.
    pub bytes_received_shm: u64,
    /// Bytes received over TCP links.
    pub bytes_received_tcp: u64,
    /// Time inside collectives.
    pub ns_total: u64,
    /// Of it, outside named phases.
    pub ns_other: u64,
    /// A flat ring's reduce-scatter.
    pub ns_reduce_scatter: u64,
    /// A flat ring's all-gather.
    pub ns_all_gather: u64,
    /// Hierarchical: the reduce-scatter inside the node.
    pub ns_intra_reduce_scatter: u64,
    /// Hierarchical: the all-reduce across nodes.
    pub ns_inter_all_reduce: u64,
    /// Hierarchical: the all-gather inside the node.
    pub ns_intra_all_gather: u64,
    /// Connection attempts link setup repeated.
    pub retries: u64,
    /// Values compression saturated.
    pub compress_overflows: u64,
    /// Non-finite values compressed calls met.
    pub compress_nonfinite: u64,
    /// Device collectives: bytes read from host-mates' device memory over CUDA IPC.
    pub bytes_device_ipc_read: u64,
    /// Device collectives: bytes copied from the device to pinned host memory.
    pub bytes_device_to_host: u64,
    /// Device collectives: bytes copied from pinned host memory to the device.
    pub bytes_host_to_device: u64,
}

impl From<&Metrics> for hetcclMetrics_t {
    fn from(m: &Metrics) -> Self {
        let ns = |p: Phase| m.time_in(p).as_nanos() as u64;
        hetcclMetrics_t {
            calls: m.calls,
            failed_calls: m.failed_calls,
            shared_calls: m.shared_calls,
            shared_bytes: m.shared_bytes,
            bytes_sent_shm: m.sent(LinkClass::Shm),
            bytes_sent_tcp: m.sent(LinkClass::Tcp),
            bytes_received_shm: m.received(LinkClass::Shm),
            bytes_received_tcp: m.received(LinkClass::Tcp),
            ns_total: m.time_total.as_nanos() as u64,
            ns_other: ns(Phase::Unnamed),
            ns_reduce_scatter: ns(Phase::ReduceScatter),
            ns_all_gather: ns(Phase::AllGather),
            ns_intra_reduce_scatter: ns(Phase::IntraReduceScatter),
            ns_inter_all_reduce: ns(Phase::InterAllReduce),
            ns_intra_all_gather: ns(Phase::IntraAllGather),
            retries: m.retries,
            compress_overflows: m.compress_overflows,
            compress_nonfinite: m.compress_nonfinite,
            bytes_device_ipc_read: m.received(LinkClass::DeviceIpc),
            bytes_device_to_host: m.sent(LinkClass::DeviceStaged),
            bytes_host_to_device: m.received(LinkClass::DeviceStaged),
        }
    }
}

/// Writes the communicator's counters.
///
/// # Safety
/// `metrics` must be NULL or point at a writable `hetcclMetrics_t`.
#[no_mangle]
pub unsafe extern "C" fn hetcclCommGetMetrics(
    comm: hetcclComm_t,
    metrics: *mut hetcclMetrics_t,
) -> hetcclResult_t {
    const F: &str = "hetcclCommGetMetrics";
    guard(F, || {
        let c = handle::lookup(F, comm)?;
        let m = hetcclMetrics_t::from(&c.comm.metrics());
        // SAFETY: forwarded contract on `metrics`.
        unsafe { out(F, "metrics", metrics, m) }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::capi::{hetcclAllReduce, hetcclCommDestroy, hetcclGetLastError};
    use crate::communicator::testing::world;
    use crate::config::{AlgoChoice, Config};
    use crate::dtype::{DataType, ReduceOp};

    #[test]
    fn the_c_counters_are_the_rust_ones() {
        let cfg = Config {
            algo: AlgoChoice::Ring,
            timeout: Duration::from_secs(20),
            ..Config::default()
        };
        let handles: Vec<usize> = world(2, 2, cfg)
            .into_iter()
            .map(|c| handle::register(c) as usize)
            .collect();
        let got: Vec<hetcclMetrics_t> = std::thread::scope(|s| {
            let hs: Vec<_> = handles
                .iter()
                .map(|&h| {
                    s.spawn(move || {
                        let h = h as hetcclComm_t;
                        let mut v = vec![1.0f32; 1000];
                        let p = v.as_mut_ptr().cast();
                        // SAFETY: `v` holds 1000 f32, in place, no stream.
                        let r = unsafe {
                            hetcclAllReduce(
                                p,
                                p,
                                1000,
                                DataType::F32 as u8 as i32,
                                ReduceOp::Sum as u8 as i32,
                                h,
                                std::ptr::null_mut(),
                            )
                        };
                        assert_eq!(r, hetcclResult_t::hetcclSuccess);
                        let mut m = hetcclMetrics_t::default();
                        // SAFETY: a live handle and a writable struct.
                        let r = unsafe { hetcclCommGetMetrics(h, &mut m) };
                        assert_eq!(r, hetcclResult_t::hetcclSuccess);
                        m
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for m in &got {
            // A 2-rank ring moves the whole 4000-byte buffer each way.
            assert_eq!(
                (m.calls, m.bytes_sent_shm, m.bytes_received_shm),
                (1, 4000, 4000)
            );
            assert_eq!(m.bytes_sent_tcp, 0);
            assert!(m.ns_reduce_scatter > 0 && m.ns_all_gather > 0, "{m:?}");
            assert_eq!(
                m.ns_total,
                m.ns_other + m.ns_reduce_scatter + m.ns_all_gather,
                "{m:?}"
            );
        }
        let h = handles[0] as hetcclComm_t;
        // SAFETY: NULL is refused before any write.
        let r = unsafe { hetcclCommGetMetrics(h, std::ptr::null_mut()) };
        assert_eq!(r, hetcclResult_t::hetcclInvalidArgument);
        // SAFETY: the thread's last error, a C string.
        let msg = unsafe { std::ffi::CStr::from_ptr(hetcclGetLastError(h)) };
        assert_eq!(
            msg.to_str().unwrap(),
            "invalid argument to hetcclCommGetMetrics: metrics is NULL"
        );
        for h in handles {
            hetcclCommDestroy(h as hetcclComm_t);
        }
    }
}
