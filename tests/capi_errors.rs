//! Every error path of the C API, called in-process through the `extern "C"`
//! functions: the exact result code and the exact `hetcclGetLastError` text.
//! Two-rank cases create both ranks in this process (one thread each, or a group).

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::Once;

use hetccl::capi::hetcclResult_t::{self, *};
use hetccl::capi::unique_id::JobTicket;
use hetccl::capi::*;
use hetccl::Config;

const F32: hetcclDataType_t = 7;
const I32: hetcclDataType_t = 2;
const SUM: hetcclRedOp_t = 0;

/// Every test of this binary runs with a short `HETCCL_TIMEOUT`, so the test that
/// provokes a stuck exchange ends quickly. Set before any communicator reads it.
fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("HETCCL_TIMEOUT", "4");
        std::env::set_var("HETCCL_CONNECT_TIMEOUT", "20");
    });
}

/// A job id whose store is on loopback.
fn loopback_id() -> hetcclUniqueId {
    let mut cfg = Config::default();
    cfg.launch.master_addr = Some("127.0.0.1".into());
    JobTicket::generate(&cfg).expect("ticket").encode()
}

fn ok(r: hetcclResult_t) {
    assert_eq!(r, hetcclSuccess, "{}", last_error());
}

/// Asserts a call's code and this thread's last error.
fn fails(r: hetcclResult_t, code: hetcclResult_t, msg: &str) {
    assert_eq!((r, last_error().as_str()), (code, msg));
}

fn solo() -> hetcclComm_t {
    setup();
    let mut c = null_mut();
    // SAFETY: `c` is a valid out-parameter.
    ok(unsafe { hetcclCommInitRank(&mut c, 1, loopback_id(), 0) });
    c
}

/// Both ranks of a 2-rank communicator, created from this one thread by a group.
fn pair() -> [hetcclComm_t; 2] {
    setup();
    let id = loopback_id();
    let mut c = [null_mut(); 2];
    ok(hetcclGroupStart());
    for (r, slot) in c.iter_mut().enumerate() {
        // SAFETY: the slots outlive hetcclGroupEnd below.
        ok(unsafe { hetcclCommInitRank(slot, 2, id, r as i32) });
    }
    assert!(
        c[0].is_null(),
        "inside a group the handle is written at hetcclGroupEnd"
    );
    ok(hetcclGroupEnd());
    c
}

/// Runs `f(rank, comm)` for both ranks at once, one thread each.
fn both<R: Send>(c: [hetcclComm_t; 2], f: impl Fn(usize, hetcclComm_t) -> R + Sync) -> [R; 2] {
    let handles = c.map(|h| h as usize);
    std::thread::scope(|s| {
        let t: Vec<_> = (0..2)
            .map(|r| {
                s.spawn({
                    let f = &f;
                    move || f(r, handles[r] as hetcclComm_t)
                })
            })
            .collect();
        let mut out = t.into_iter().map(|t| t.join().expect("rank thread"));
        [out.next().unwrap(), out.next().unwrap()]
    })
}

unsafe fn all_reduce(x: &mut [f32], comm: hetcclComm_t) -> hetcclResult_t {
    let p = x.as_mut_ptr() as *mut c_void;
    // SAFETY: `x` holds `x.len()` floats.
    unsafe { hetcclAllReduce(p, p, x.len(), F32, SUM, comm, null_mut()) }
}

#[test]
fn bad_datatype_and_op_values() {
    let c = solo();
    let mut x = [1.0f32; 4];
    let p = x.as_mut_ptr() as *mut c_void;
    // SAFETY (this test): buffers are valid for the counts passed.
    unsafe {
        fails(
            hetcclAllReduce(p, p, 4, 42, SUM, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclAllReduce: datatype 42 is not a hetcclDataType_t (valid values are 0 to 9)",
        );
        fails(
            hetcclAllReduce(p, p, 4, F32, 9, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclAllReduce: op 9 is not a hetcclRedOp_t (valid values are 0 to 4)",
        );
        fails(
            hetcclReduceScatter(p, p, 4, -3, SUM, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclReduceScatter: datatype -3 is not a hetcclDataType_t (valid values are 0 to 9)",
        );
        fails(
            hetcclReduce(p, p, 4, F32, -1, 0, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclReduce: op -1 is not a hetcclRedOp_t (valid values are 0 to 4)",
        );
        fails(
            hetcclSend(p, 4, 10, 0, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclSend: datatype 10 is not a hetcclDataType_t (valid values are 0 to 9)",
        );
        // None of that touched the buffer or broke the communicator.
        assert_eq!(x, [1.0; 4]);
        ok(all_reduce(&mut x, c));
        assert_eq!(x, [1.0; 4], "one rank: the sum is the input");
    }
    ok(hetcclCommDestroy(c));
}

#[test]
fn null_buffer_with_nonzero_count() {
    let c = solo();
    let mut x = [2i32; 3];
    let p = x.as_mut_ptr() as *mut c_void;
    // SAFETY (this test): non-NULL buffers are valid for the counts passed.
    unsafe {
        fails(
            hetcclAllReduce(null(), p, 3, I32, SUM, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclAllReduce: sendbuff is NULL but count is 3",
        );
        fails(
            hetcclAllGather(p, null_mut(), 3, I32, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclAllGather: recvbuff is NULL but count is 3",
        );
        fails(
            hetcclBroadcast(null(), p, 3, I32, 0, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclBroadcast: sendbuff is NULL but count is 3",
        );
        fails(
            hetcclRecv(null_mut(), 1, I32, 0, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclRecv: recvbuff is NULL but count is 1",
        );
        // Zero elements: NULL is fine, as in NCCL.
        ok(hetcclAllReduce(
            null(),
            null_mut(),
            0,
            I32,
            SUM,
            c,
            null_mut(),
        ));
        ok(hetcclAllGather(null(), null_mut(), 0, I32, c, null_mut()));
        // Out-of-place broadcast on the root copies send to receive.
        let src = [7i32, 8, 9];
        ok(hetcclBroadcast(
            src.as_ptr().cast(),
            p,
            3,
            I32,
            0,
            c,
            null_mut(),
        ));
        assert_eq!(x, [7, 8, 9]);
    }
    ok(hetcclCommDestroy(c));
}

#[test]
fn misaligned_buffer_is_refused() {
    let c = solo();
    let words = [0u64; 4];
    let odd = (words.as_ptr() as *const u8).wrapping_add(1) as *mut c_void;
    // SAFETY: refused before any access.
    let r = unsafe { hetcclAllReduce(odd, odd, 2, F32, SUM, c, null_mut()) };
    fails(
        r,
        hetcclInvalidArgument,
        &format!("invalid argument to hetcclAllReduce: sendbuff {odd:p} is not aligned to 4 bytes, as f32 elements must be"),
    );
    ok(hetcclCommDestroy(c));
}

#[test]
fn overlapping_buffers_outside_the_in_place_layout_are_refused() {
    let c = pair();
    let out = both(c, |r, comm| {
        // Two blocks of 4; rank r's block starts at element 4r.
        let mut x: Vec<f32> = (0..8).map(|i| (10 * r + i) as f32).collect();
        let base = x.as_mut_ptr();
        let at = |i: usize| base.wrapping_add(i) as *mut c_void;
        // recvbuff one element into the buffer, this rank's block on neither rank:
        // refused, nothing written.
        // SAFETY: refused before any access.
        let refused = unsafe { hetcclReduceScatter(at(0), at(1), 4, F32, SUM, comm, null_mut()) };
        let message = last_error();
        let untouched = x.clone();
        // NCCL's layout: recvbuff = sendbuff + rank x recvcount.
        // SAFETY: `x` holds 8 floats and outlives the call.
        let rs = unsafe { hetcclReduceScatter(at(0), at(4 * r), 4, F32, SUM, comm, null_mut()) };
        let after_rs = x.clone();
        // All-gather in place: sendbuff = recvbuff + rank x sendcount, inside a group
        // (checked at the call, run at hetcclGroupEnd).
        ok(hetcclGroupStart());
        // SAFETY: as above; `x` outlives hetcclGroupEnd.
        let ag = unsafe { hetcclAllGather(at(4 * r), at(0), 4, F32, comm, null_mut()) };
        let ag = if ag == hetcclSuccess {
            hetcclGroupEnd()
        } else {
            ag
        };
        (
            refused,
            message,
            untouched,
            rs,
            after_rs,
            ag,
            x,
            base as usize,
        )
    });
    for (r, (refused, message, untouched, rs, after_rs, ag, x, base)) in out.into_iter().enumerate()
    {
        let range = |from: usize, n: usize| {
            format!("[{:#x}, {:#x})", base + 4 * from, base + 4 * (from + n))
        };
        assert_eq!(refused, hetcclInvalidArgument);
        assert_eq!(
            message,
            format!(
                "invalid argument to hetcclReduceScatter: sendbuff {} and recvbuff {} overlap; \
                 in place, recvbuff must be sendbuff + rank x recvcount elements (here {:#x})",
                range(0, 8),
                range(1, 4),
                base + 16 * r
            )
        );
        let mine: Vec<f32> = (0..8).map(|i| (10 * r + i) as f32).collect();
        assert_eq!(untouched, mine, "rank {r}: a refused call writes nothing");
        ok(rs);
        ok(ag);
        // Block b reduced: (b*4 + i) + (10 + b*4 + i); the other block left as it was.
        let sum = |i: usize| (2 * i + 10) as f32;
        let want: Vec<f32> = (0..8)
            .map(|i| if i / 4 == r { sum(i) } else { mine[i] })
            .collect();
        assert_eq!(after_rs, want, "rank {r}: in-place reduce-scatter");
        // After the all-gather every rank holds both reduced blocks.
        assert_eq!(
            x,
            (0..8).map(sum).collect::<Vec<_>>(),
            "rank {r}: in-place all-gather"
        );
    }
    for comm in c {
        ok(hetcclCommDestroy(comm));
    }
}

#[test]
fn destroyed_or_unknown_communicator_is_refused() {
    let c = solo();
    let mut n = 0;
    // SAFETY: valid out-parameter.
    ok(unsafe { hetcclCommCount(c, &mut n) });
    assert_eq!(n, 1);
    ok(hetcclCommDestroy(c));
    let dead =
        format!("comm {c:p} is not a live communicator (it was destroyed, or never created)");
    let mut x = [1.0f32; 2];
    // SAFETY (this block): valid buffers and out-parameters.
    unsafe {
        fails(
            all_reduce(&mut x, c),
            hetcclInvalidArgument,
            &format!("invalid argument to hetcclAllReduce: {dead}"),
        );
        fails(
            hetcclCommUserRank(c, &mut n),
            hetcclInvalidArgument,
            &format!("invalid argument to hetcclCommUserRank: {dead}"),
        );
    }
    fails(
        hetcclCommDestroy(c),
        hetcclInvalidArgument,
        &format!("invalid argument to hetcclCommDestroy: {dead}"),
    );
    fails(
        hetcclCommAbort(c),
        hetcclInvalidArgument,
        &format!("invalid argument to hetcclCommAbort: {dead}"),
    );
    // A value that was never a handle, and NULL.
    let forged = 0x5a5a0 as hetcclComm_t;
    fails(
        hetcclCommDestroy(forged),
        hetcclInvalidArgument,
        "invalid argument to hetcclCommDestroy: comm 0x5a5a0 is not a live communicator (it was destroyed, or never created)",
    );
    // SAFETY: valid buffer.
    fails(
        unsafe { all_reduce(&mut x, null_mut()) },
        hetcclInvalidArgument,
        "invalid argument to hetcclAllReduce: comm is NULL",
    );
    // A new communicator never reuses a dead handle's value.
    let c2 = solo();
    assert_ne!(c2, c);
    ok(hetcclCommAbort(c2));
}

#[test]
fn non_null_stream_needs_the_cuda_feature() {
    let c = solo();
    let mut x = [1.0f32; 2];
    let p = x.as_mut_ptr() as *mut c_void;
    let stream = 0x7f00 as hetcclStream_t;
    // SAFETY: refused before any access.
    let r = unsafe { hetcclAllReduce(p, p, 2, F32, SUM, c, stream) };
    fails(
        r,
        hetcclInvalidArgument,
        &format!(
            "invalid argument to hetcclAllReduce: stream 0x7f00 is not NULL; {}",
            if cfg!(feature = "cuda") {
                "the host collectives take host buffers; device buffers and their CUDA stream \
                 go through the hetcclDevice* calls (hetcclDeviceCommInit)"
            } else {
                "this build of hetccl works on host buffers only, device buffers and CUDA \
                 streams need hetccl built with the cuda feature (the hetcclDevice* calls)"
            }
        ),
    );
    ok(hetcclCommDestroy(c));
}

/// The device calls where no GPU can be used (no `cuda` feature, or no driver): each
/// fails with the reason, after the argument and group checks every build makes. With
/// a GPU the device calls are checked by `hetccl-gpu-check --capi` (tools/).
#[test]
fn device_calls_without_a_usable_gpu_say_why() {
    let why = match hetccl::device::available() {
        Ok(n) => {
            hetccl_testkit::skip(&format!(
                "{n} GPU(s) usable: the device calls are checked on them by hetccl-gpu-check"
            ));
            return;
        }
        Err(why) => why,
    };
    let c = solo();
    let mut d: hetcclDeviceComm_t = null_mut();
    // SAFETY (this block): valid out-parameters; no buffer is touched.
    unsafe {
        fails(
            hetcclDeviceCommInit(null_mut(), c, 0),
            hetcclInvalidArgument,
            "invalid argument to hetcclDeviceCommInit: dcomm is NULL",
        );
        ok(hetcclGroupStart());
        fails(
            hetcclDeviceCommInit(&mut d, c, 0),
            hetcclInvalidUsage,
            "invalid use of hetcclDeviceCommInit: device calls cannot be part of a group; call \
             it outside hetcclGroupStart / hetcclGroupEnd",
        );
        ok(hetcclGroupEnd());
        fails(
            hetcclDeviceCommInit(&mut d, c, -1),
            hetcclInvalidArgument,
            "invalid argument to hetcclDeviceCommInit: device -1 is negative",
        );
        fails(
            hetcclDeviceCommInit(&mut d, c, 0),
            hetcclUnhandledCudaError,
            &format!(
                "device: {}: {why}",
                if cfg!(feature = "cuda") {
                    "open device 0"
                } else {
                    "hetcclDeviceCommInit"
                }
            ),
        );
        assert!(d.is_null(), "no handle is written when init fails");
        let mut x = [1.0f32; 4];
        let p = x.as_mut_ptr() as *mut c_void;
        let r = hetcclDeviceAllReduce(p, p, 4, F32, SUM, null_mut(), null_mut());
        if cfg!(feature = "cuda") {
            fails(
                r,
                hetcclInvalidArgument,
                "invalid argument to hetcclDeviceAllReduce: dcomm is NULL",
            );
            // A host communicator's handle is not a device communicator's.
            fails(
                hetcclDeviceAllReduce(p, p, 4, F32, SUM, c as hetcclDeviceComm_t, null_mut()),
                hetcclInvalidArgument,
                &format!(
                    "invalid argument to hetcclDeviceAllReduce: dcomm {c:p} is not a live \
                     device communicator (it was destroyed, or never created)"
                ),
            );
        } else {
            fails(
                r,
                hetcclUnhandledCudaError,
                &format!("device: hetcclDeviceAllReduce: {why}"),
            );
        }
    }
    fails(
        hetcclDeviceCommDestroy(null_mut()),
        hetcclInvalidArgument,
        "invalid argument to hetcclDeviceCommDestroy: dcomm is NULL",
    );
    assert_eq!(hetccl::capi::device::live_count(), 0);
    ok(hetcclCommDestroy(c));
}

#[test]
fn bad_roots_and_peers() {
    let c = solo();
    let mut x = [0.0f32; 2];
    let p = x.as_mut_ptr() as *mut c_void;
    // SAFETY (this block): valid buffers.
    unsafe {
        fails(
            hetcclBroadcast(p, p, 2, F32, 1, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclBroadcast: root 1 is not a rank of this communicator (world size 1)",
        );
        fails(
            hetcclReduce(p, p, 2, F32, SUM, -1, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclReduce: root -1 is not a rank of this communicator (world size 1)",
        );
        fails(
            hetcclSend(p, 2, F32, 3, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclSend: peer 3 is not a rank of this communicator (world size 1)",
        );
        // A send to oneself outside a group has nobody to receive it.
        fails(
            hetcclSend(p, 2, F32, 0, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to send/recv: a rank cannot send to or receive from itself",
        );
    }
    ok(hetcclCommDestroy(c));
}

#[test]
fn init_rank_argument_errors() {
    setup();
    let id = loopback_id();
    let mut c = null_mut();
    // SAFETY (this block): `c` is a valid out-parameter, or NULL on purpose.
    unsafe {
        fails(
            hetcclCommInitRank(&mut c, 0, id, 0),
            hetcclInvalidArgument,
            "invalid argument to hetcclCommInitRank: nranks is 0; it must be at least 1",
        );
        fails(
            hetcclCommInitRank(&mut c, 2, id, 2),
            hetcclInvalidArgument,
            "invalid argument to hetcclCommInitRank: rank 2 is outside 0..2",
        );
        fails(
            hetcclCommInitRank(null_mut(), 1, id, 0),
            hetcclInvalidArgument,
            "invalid argument to hetcclCommInitRank: comm is NULL",
        );
        let mut bad = id;
        bad.internal[0] = b'X' as _;
        fails(
            hetcclCommInitRank(&mut c, 1, bad, 0),
            hetcclInvalidArgument,
            "invalid argument to hetcclCommInitRank: id is not a hetcclUniqueId from hetcclGetUniqueId (it \
             starts with [58, 43, 55, 31], not \"HCU1\"); every rank must receive rank 0's id unchanged",
        );
        fails(
            hetcclGetUniqueId(null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclGetUniqueId: uniqueId is NULL",
        );
        fails(
            hetcclCommInitFromEnv(null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclCommInitFromEnv: comm is NULL",
        );
        fails(
            hetcclGetVersion(null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclGetVersion: version is NULL",
        );
    }
    assert!(c.is_null(), "no handle is written on failure");
}

#[test]
fn mismatched_counts_across_two_ranks() {
    let c = pair();
    let results = both(c, |r, comm| {
        let mut x = vec![1.0f32; 4 + r];
        // SAFETY: valid buffer.
        let code = unsafe { all_reduce(&mut x, comm) };
        let first = (code, last_error());
        // SAFETY: valid buffer.
        let again = unsafe { all_reduce(&mut x[..4], comm) };
        (first, (again, last_error()))
    });
    // Both ranks share a host, so calls this small meet in the eager slots, where each
    // rank reads the other's call.
    let expected = [
        "rank 0: all_reduce #0 does not match what peer 1 sent: expected all_reduce #0 of 4 x f32 \
         (sum op), peer runs all_reduce #0 of 5 x f32 (sum op)",
        "rank 1: all_reduce #0 does not match what peer 0 sent: expected all_reduce #0 of 5 x f32 \
         (sum op), peer runs all_reduce #0 of 4 x f32 (sum op)",
    ];
    let mut mismatches = 0;
    for (r, ((code, msg), (again, msg2))) in results.into_iter().enumerate() {
        if code == hetcclInvalidUsage {
            assert_eq!(msg, expected[r]);
            mismatches += 1;
        } else {
            // The peer found the mismatch first and aborted the link under this rank.
            assert_eq!(code, hetcclRemoteError, "rank {r}: {msg}");
            assert!(
                msg.starts_with(&format!(
                    "rank {r}: peer {} is gone during all_reduce #0: ",
                    1 - r
                )),
                "{msg}"
            );
        }
        // After a failure the communicator refuses further work, naming the cause.
        assert_eq!(
            (again, msg2),
            (
                hetcclInvalidUsage,
                format!("communicator is unusable after an earlier error: {msg}")
            )
        );
    }
    assert!(
        mismatches >= 1,
        "at least the first rank to look names the mismatch"
    );
    for h in c {
        ok(hetcclCommDestroy(h));
    }
}

#[test]
fn group_misuse() {
    setup();
    fails(
        hetcclGroupEnd(),
        hetcclInvalidUsage,
        "invalid use of hetcclGroupEnd: no group is open on this thread (call hetcclGroupStart first)",
    );
    let c = solo();
    let mut x = [3.0f32; 2];
    let p = x.as_mut_ptr() as *mut c_void;
    ok(hetcclGroupStart());
    ok(hetcclGroupStart()); // nested: only the outermost end runs the group
                            // SAFETY (this block): `x` outlives the group.
    unsafe {
        ok(hetcclAllReduce(p, p, 2, F32, 0, c, null_mut()));
        fails(
            hetcclAllReduce(p, p, 2, 99, 0, c, null_mut()),
            hetcclInvalidArgument,
            "invalid argument to hetcclAllReduce: datatype 99 is not a hetcclDataType_t (valid values are 0 to 9)",
        );
    }
    ok(hetcclGroupEnd());
    fails(
        hetcclGroupEnd(),
        hetcclInvalidArgument,
        "a call in this group failed: invalid argument to hetcclAllReduce: datatype 99 is not a \
         hetcclDataType_t (valid values are 0 to 9)",
    );
    // The group was dropped whole; the next group starts clean.
    ok(hetcclGroupStart());
    ok(hetcclGroupEnd());
    ok(hetcclCommDestroy(c));
}

#[test]
fn send_to_self_inside_a_group_is_a_copy() {
    let c = solo();
    let src = [1i32, 2, 3];
    let mut dst = [0i32; 3];
    // SAFETY (this block): buffers outlive each group.
    unsafe {
        ok(hetcclGroupStart());
        ok(hetcclRecv(
            dst.as_mut_ptr().cast(),
            3,
            I32,
            0,
            c,
            null_mut(),
        ));
        ok(hetcclSend(src.as_ptr().cast(), 3, I32, 0, c, null_mut()));
        ok(hetcclGroupEnd());
        assert_eq!(dst, [1, 2, 3]);
        ok(hetcclGroupStart());
        ok(hetcclSend(src.as_ptr().cast(), 3, I32, 0, c, null_mut()));
        ok(hetcclRecv(
            dst.as_mut_ptr().cast(),
            2,
            I32,
            0,
            c,
            null_mut(),
        ));
        fails(
            hetcclGroupEnd(),
            hetcclInvalidArgument,
            "invalid argument to hetcclGroupEnd: a send of 3 x i32 to this rank is matched with a receive \
             of 2 x i32 from it; counts and datatypes must be equal",
        );
        ok(hetcclGroupStart());
        ok(hetcclSend(src.as_ptr().cast(), 3, I32, 0, c, null_mut()));
        fails(
            hetcclGroupEnd(),
            hetcclInvalidArgument,
            "invalid argument to hetcclGroupEnd: rank 0 sends to itself 1 times but receives from itself 0 \
             times in this group; they must pair up",
        );
    }
    ok(hetcclCommDestroy(c));
}

#[test]
fn error_strings() {
    let s = |r: i32| {
        // SAFETY: hetcclGetErrorString returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(hetcclGetErrorString(r)) }
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(s(0), "no error");
    assert_eq!(s(4), "invalid argument");
    assert_eq!(s(8), "a peer made no progress within HETCCL_TIMEOUT");
    assert_eq!(s(9), "unknown result code");
    assert_eq!(s(-1), "unknown result code");
    let mut v = 0;
    // SAFETY: valid out-parameter.
    ok(unsafe { hetcclGetVersion(&mut v) });
    assert_eq!(v, 100, "0.1.0");
}

/// Both ranks send 64 MiB to each other, then receive. Outside a group each rank's
/// send waits for a receive the peer never reaches: both time out, naming the peer.
/// Inside a group the same calls complete and deliver the right data.
#[test]
fn large_exchange_deadlocks_outside_a_group_and_completes_inside() {
    const N: usize = 16 << 20;
    let c = pair();
    let out = both(c, |r, comm| {
        let send = vec![r as f32 + 1.0; N];
        let mut recv = vec![0.0f32; N];
        let peer = 1 - r as i32;
        // SAFETY: buffers hold N floats.
        let code = unsafe {
            let s = hetcclSend(send.as_ptr().cast(), N, F32, peer, comm, null_mut());
            if s != hetcclSuccess {
                s
            } else {
                hetcclRecv(recv.as_mut_ptr().cast(), N, F32, peer, comm, null_mut())
            }
        };
        (code, last_error())
    });
    // The first rank to time out aborts its links, so its peer may see that abort
    // (a remote error naming it) before its own timeout fires.
    eprintln!("{out:?}");
    let timed_out: Vec<usize> = (0..2).filter(|&r| out[r].0 == hetcclTimeout).collect();
    assert!(!timed_out.is_empty(), "{out:?}");
    for (r, (code, msg)) in out.iter().enumerate() {
        let peer = 1 - r;
        if *code == hetcclTimeout {
            assert!(
                msg.starts_with(&format!("rank {r}: send/recv #0 timed out after "))
                    && msg.ends_with(&format!(" waiting for peer {peer} to accept data")),
                "rank {r}: {msg}"
            );
        } else {
            assert_eq!(*code, hetcclRemoteError, "rank {r}: {msg}");
            assert!(
                msg.starts_with(&format!(
                    "rank {r}: peer {peer} is gone during send/recv #0: "
                )),
                "rank {r}: {msg}"
            );
        }
    }
    for h in c {
        ok(hetcclCommDestroy(h));
    }

    let c = pair();
    let out = both(c, |r, comm| {
        let send = vec![r as f32 + 1.0; N];
        let mut recv = vec![0.0f32; N];
        let peer = 1 - r as i32;
        ok(hetcclGroupStart());
        // SAFETY: buffers outlive the group.
        unsafe {
            ok(hetcclSend(
                send.as_ptr().cast(),
                N,
                F32,
                peer,
                comm,
                null_mut(),
            ));
            ok(hetcclRecv(
                recv.as_mut_ptr().cast(),
                N,
                F32,
                peer,
                comm,
                null_mut(),
            ));
        }
        let code = hetcclGroupEnd();
        (
            code,
            last_error(),
            recv.iter().all(|&v| v == (peer + 1) as f32),
        )
    });
    for (r, (code, msg, right)) in out.into_iter().enumerate() {
        assert_eq!(code, hetcclSuccess, "rank {r}: {msg}");
        assert!(right, "rank {r} received the peer's values");
    }
    for h in c {
        ok(hetcclCommDestroy(h));
    }
}

/// `hetcclCommSetTimeout`: the next call waits the new timeout for a silent peer (the
/// pair was made with HETCCL_TIMEOUT=60), and values outside HETCCL_TIMEOUT's range or a
/// dead handle are refused.
#[test]
fn set_timeout_applies_to_the_next_call() {
    setup();
    let id = loopback_id();
    let mut c = [null_mut(); 2];
    ok(hetcclGroupStart());
    for (r, slot) in c.iter_mut().enumerate() {
        // SAFETY: the slots outlive hetcclGroupEnd; the settings are NUL-terminated.
        ok(unsafe {
            hetcclCommInitRankSettings(slot, 2, id, r as i32, c"HETCCL_TIMEOUT=60".as_ptr())
        });
    }
    ok(hetcclGroupEnd());
    for bad in [0.0, 0.0009, 604800.5, f64::NAN, -1.0] {
        fails(
            hetcclCommSetTimeout(c[0], bad),
            hetcclInvalidArgument,
            &format!(
                "invalid argument to hetcclCommSetTimeout: seconds is {bad}; it must be from \
                 0.001 to 604800 (one week), as HETCCL_TIMEOUT"
            ),
        );
    }
    let out = both(c, |r, comm| {
        let mut x = vec![1.0f32; 8];
        // SAFETY: `x` holds 8 floats.
        ok(unsafe { all_reduce(&mut x, comm) });
        if r == 1 {
            return None; // never makes the second call
        }
        ok(hetcclCommSetTimeout(comm, 0.5));
        let t0 = std::time::Instant::now();
        // SAFETY: as above.
        let code = unsafe { all_reduce(&mut x, comm) };
        Some((code, last_error(), t0.elapsed()))
    });
    let (code, msg, took) = out[0].clone().expect("rank 0's outcome");
    assert_eq!(code, hetcclTimeout, "{msg}");
    assert!(
        msg.starts_with("rank 0: all_reduce #1 timed out after ")
            && msg.contains(" waiting for peer 1 "),
        "{msg}"
    );
    assert!(took < std::time::Duration::from_secs(30), "{took:?}: {msg}");
    for h in c {
        ok(hetcclCommAbort(h));
    }
    assert_eq!(hetcclCommSetTimeout(c[0], 1.0), hetcclInvalidArgument);
    assert!(
        last_error().ends_with(" is not a live communicator (it was destroyed, or never created)"),
        "{}",
        last_error()
    );
}
