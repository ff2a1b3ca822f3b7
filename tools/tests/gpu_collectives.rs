//! Device collectives across processes: `hetccl run -n N -- hetccl-gpu-check`, over
//! CUDA IPC (every rank on this host, several ranks per GPU when GPUs are fewer) and
//! staged through pinned host memory (forced, or picked for pretend hosts).
//!
//! `hetccl-gpu-check` checks every element against host values and prints
//! `N checks passed, #wrong=0` per rank; these tests require exactly that on every rank.
//! For each count there are 22 checks per dtype (5 ops x all-reduce in and out of place,
//! reduce-scatter and reduce; broadcast; all-gather), so 198 for three counts and three
//! dtypes, plus 2 determinism checks (3 on the IPC path, which also matches a host sum in
//! rank order), 2 calls that a rank refuses (each rank must name why), and on the
//! hierarchical path (pretend hosts, one holding two ranks) the bytes per link class.
//! `--capi` runs the collectives through the C API's device calls instead.
//! Two ranks on two pretend hosts stay flat (one rank per host): the hierarchical
//! tests run 3 ranks (2 + 1) and 4 (2 + 2).
//!
//! The executables are found through `HETCCL_BIN_DIR`, next to this test executable
//! (the layout of `gpu-bin/`, see scripts/build-gpu-bin.sh), or in cargo's target
//! directory (`hetccl_testkit::ranks::workspace_bin`). Built with the `cuda` feature only; without a usable GPU each test records
//! itself as skipped with the reason (`common::skip`), which the test script counts.

mod common;

#[cfg(feature = "cuda")]
mod gpu {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use super::common::{collect, spawn_ranks, Outcome};

    const COUNTS: &str = "1,1000,1048579";

    fn launcher() -> PathBuf {
        super::common::workspace_bin("hetccl")
    }

    fn check_bin() -> PathBuf {
        super::common::workspace_bin("hetccl-gpu-check")
    }

    /// The reason to skip, printed, when there is no usable GPU.
    fn no_gpu() -> bool {
        match hetccl::device::available() {
            Ok(n) => {
                println!("{n} GPU(s) visible");
                false
            }
            Err(why) => {
                super::common::skip(&why);
                true
            }
        }
    }

    /// `hetccl run -n n -- hetccl-gpu-check ARGS` with `env`.
    fn run(n: usize, args: &[&str], env: &[(&str, &str)]) -> Outcome {
        let mut c = Command::new(launcher());
        c.args(["run", "-n", &n.to_string(), "--"])
            .arg(check_bin())
            .args(args)
            .env("HETCCL_TIMEOUT", "60")
            .env("HETCCL_CONNECT_TIMEOUT", "30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().expect("start hetccl run");
        let out = collect(vec![child], Duration::from_secs(420))
            .pop()
            .expect("one outcome");
        println!("{}", out.output);
        out
    }

    /// Asserts success, `path` on every rank, and `checks` checks with none wrong on
    /// every rank.
    fn assert_passed(out: &Outcome, n: usize, path: &str, checks: usize, what: &str) {
        assert!(!out.hung, "{what}: hung:\n{}", out.output);
        assert_eq!(out.code, Some(0), "{what}: failed:\n{}", out.output);
        for r in 0..n {
            let ready = format!("[rank {r}] rank {r}/{n}: device ");
            let line = out
                .output
                .lines()
                .find(|l| l.starts_with(&ready))
                .unwrap_or_else(|| panic!("{what}: no device line from rank {r}:\n{}", out.output));
            assert!(line.ends_with(&format!("path {path}")), "{what}: {line}");
            let done =
                format!("[rank {r}] rank {r}/{n}: {checks} checks passed, #wrong=0 (path {path}");
            assert!(
                out.output.lines().any(|l| l.starts_with(&done)),
                "{what}: rank {r} did not report `{done}`:\n{}",
                out.output
            );
        }
    }

    /// Asserts that each of ranks `0..n` printed the whole line `line(r)`.
    fn assert_every_rank_printed(out: &Outcome, n: usize, line: impl Fn(usize) -> String) {
        for r in 0..n {
            let want = line(r);
            assert!(
                out.output.lines().any(|l| l == want),
                "no `{want}` in:\n{}",
                out.output
            );
        }
    }

    #[test]
    fn two_ranks_over_ipc() {
        if no_gpu() {
            return;
        }
        let out = run(2, &["--path", "auto", "--counts", COUNTS], &[]);
        assert_passed(&out, 2, "ipc", 203, "ipc n=2");
    }

    /// The C API's device calls (`hetccl-gpu-check --capi`): per dtype and count 10
    /// checks (sum and max: all-reduce out of place and in place, reduce, reduce-scatter;
    /// broadcast; all-gather), 90 for three counts, then the wait for the caller's stream
    /// and, with more than one rank, the two refused buffers and a call after them.
    #[test]
    fn the_c_api_device_calls() {
        if no_gpu() {
            return;
        }
        for (n, checks) in [(2, 94), (3, 94)] {
            let out = run(n, &["--capi", "--counts", COUNTS], &[]);
            assert!(!out.hung, "capi n={n}: hung:\n{}", out.output);
            assert_eq!(out.code, Some(0), "capi n={n}: failed:\n{}", out.output);
            assert_every_rank_printed(&out, n, |r| {
                format!("[rank {r}] rank {r}/{n}: {checks} C API checks passed, #wrong=0")
            });
        }
    }

    #[test]
    fn four_ranks_over_ipc() {
        if no_gpu() {
            return;
        }
        let out = run(4, &["--path", "ipc", "--counts", COUNTS], &[]);
        assert_passed(&out, 4, "ipc", 203, "ipc n=4");
    }

    #[test]
    fn ipc_in_windows_smaller_than_the_message() {
        if no_gpu() {
            return;
        }
        // A 1 MiB window: 262128 f32 (a multiple of 8 per rank) per all-reduce window,
        // so 1048579 elements take five windows, the last one partial; the scratch stays
        // at one 2 MiB page instead of growing to the 4 MiB message.
        // Both ways to reduce a window: a segment each and then gathering them (two
        // device fences), and every rank the whole window (one fence).
        for shots in ["0", "1M"] {
            let env = [
                ("HETCCL_DEVICE_SCRATCH_BYTES", "1M"),
                ("HETCCL_DEVICE_ONE_SHOT_BYTES", shots),
            ];
            let out = run(3, &["--path", "ipc", "--counts", "1000,1048579"], &env);
            let what = format!("ipc n=3 in 1 MiB windows, one shot up to {shots}");
            assert_passed(&out, 3, "ipc", 137, &what);
            assert_every_rank_printed(&out, 3, |r| {
                format!("[rank {r}] rank {r}/3: 137 checks passed, #wrong=0 (path ipc, scratch 2097152 bytes)")
            });
        }
    }

    /// Rank 1 of 2 aborts while both run 64 MiB all-reduces: rank 0 must fail naming
    /// it, whether it was waiting on the host (a barrier, the next call's header) or
    /// its stream was waiting for rank 1's counter (a device fence), and not hang.
    fn a_dead_peer_is_named(fence: &str) {
        let children = spawn_ranks(
            2,
            check_bin().to_str().expect("utf-8 path"),
            &[
                "--path",
                "ipc",
                "--counts",
                "1",
                "--time",
                "16777216",
                "--iters",
                "100000",
                "--die-after",
                "3",
            ],
            &[("HETCCL_TIMEOUT", "5"), ("HETCCL_DEVICE_FENCE", fence)],
            |_| vec![],
        );
        let outs = collect(children, Duration::from_secs(60));
        for (r, o) in outs.iter().enumerate() {
            println!("rank {r} ({fence} fences), {:?}:\n{}", o.elapsed, o.output);
            assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        }
        assert!(
            outs[1].output.contains("rank 1: aborting on purpose"),
            "{}",
            outs[1].output
        );
        let o = &outs[0];
        assert_eq!(o.code, Some(1), "{}", o.output);
        assert!(
            o.output.contains("peer 1 is gone") || o.output.contains("waiting for peer 1"),
            "{}",
            o.output
        );
        // Three seconds of work, then at most the 5 s timeout and the clean-up.
        assert!(o.elapsed < Duration::from_secs(20), "{:?}", o.elapsed);
    }

    /// Rank 1's stream is held for 6 s before its first collective, as behind a hung
    /// kernel, while its host goes on. With a 2 s timeout rank 0 must give up naming
    /// rank 1: under device fences its own stream waits for rank 1's counter, under
    /// host fences it waits for rank 1 at a barrier.
    fn a_held_stream_is_named(fence: &str) -> Vec<Outcome> {
        let children = spawn_ranks(
            2,
            check_bin().to_str().expect("utf-8 path"),
            &["--path", "ipc", "--counts", "1", "--stall-gpu", "6"],
            &[("HETCCL_TIMEOUT", "2"), ("HETCCL_DEVICE_FENCE", fence)],
            |_| vec![],
        );
        // Rank 1 may not end before its stream is released; only rank 0 must.
        let outs = collect(children, Duration::from_secs(20));
        for (r, o) in outs.iter().enumerate() {
            println!("rank {r} ({fence} fences), {:?}:\n{}", o.elapsed, o.output);
        }
        let o = &outs[0];
        assert!(!o.hung, "rank 0 hung:\n{}", o.output);
        assert_eq!(o.code, Some(1), "{}", o.output);
        assert!(
            o.output.contains("timed out after 2") && o.output.contains("waiting for peer 1"),
            "{}",
            o.output
        );
        assert!(o.elapsed < Duration::from_secs(15), "{:?}", o.elapsed);
        outs
    }

    #[test]
    fn a_held_stream_is_named_under_device_fences() {
        if no_gpu() {
            return;
        }
        let outs = a_held_stream_is_named("device");
        assert!(
            outs[0]
                .output
                .contains("waiting for peer 1 to reach the same device fence"),
            "{}",
            outs[0].output
        );
        // Rank 1 gives up on its own stream, which its peer is not holding.
        assert!(
            outs[1].output.contains(
                "the stream did not drain within 2s, although every peer passed the last \
                 device fence"
            ),
            "{}",
            outs[1].output
        );
    }

    #[test]
    fn a_held_stream_is_named_under_host_fences() {
        if no_gpu() {
            return;
        }
        a_held_stream_is_named("host");
    }

    #[test]
    fn a_dead_peer_is_named_under_device_fences() {
        if no_gpu() {
            return;
        }
        a_dead_peer_is_named("device");
    }

    #[test]
    fn a_dead_peer_is_named_under_host_fences() {
        if no_gpu() {
            return;
        }
        a_dead_peer_is_named("host");
    }

    #[test]
    fn ipc_with_host_fences() {
        if no_gpu() {
            return;
        }
        // The host drains and meets the peers between phases instead of the streams
        // waiting on each other's counters; five windows as above.
        let env = [
            ("HETCCL_DEVICE_SCRATCH_BYTES", "1M"),
            ("HETCCL_DEVICE_FENCE", "host"),
        ];
        let out = run(2, &["--path", "ipc", "--counts", "1000,1048579"], &env);
        assert_passed(&out, 2, "ipc", 137, "ipc n=2, host fences");
    }

    #[test]
    fn staged_through_pinned_host_memory() {
        if no_gpu() {
            return;
        }
        // 40000-byte slots: 10000 f32 or 20000 f16 per piece, so the largest count takes
        // over a hundred pieces and ends with a partial one; each piece's host collective
        // runs in chunks of the same size.
        let small = [
            ("HETCCL_DEVICE_STAGE_BYTES", "40000"),
            ("HETCCL_CHUNK_BYTES", "40000"),
        ];
        let out = run(2, &["--path", "staged", "--counts", COUNTS], &small);
        assert_passed(&out, 2, "staged", 202, "staged n=2");
        // Three ranks on two pretend hosts (2 + 1): auto must pick the staged path, its
        // all-reduces hierarchical (one more check: the bytes per link class).
        let out = run(3, &["--pretend-nodes", "2", "--counts", COUNTS], &small);
        assert_passed(&out, 3, "staged", 203, "pretend hosts n=3");
        // The default 2 MiB slots: 1048579 f32 take two whole pieces and a partial one,
        // each a host collective of several chunks.
        let out = run(2, &["--path", "staged", "--counts", COUNTS], &[]);
        assert_passed(&out, 2, "staged", 202, "staged n=2, default slots");
    }

    /// Asserts that every rank of `n` reported the bytes per link class of an all-reduce
    /// of `count` f32, and that the timing lines name the hierarchical path.
    fn assert_hierarchical(out: &Outcome, n: usize, count: usize) {
        for r in 0..n {
            let head = format!(
                "[rank {r}] rank {r}: hierarchical all_reduce of {} bytes moved ipc ",
                count * 4
            );
            assert!(
                out.output.lines().any(|l| l.starts_with(&head)),
                "no `{head}` in:\n{}",
                out.output
            );
        }
        assert!(
            out.output.contains(&format!("on {n} ranks (staged-hier)")),
            "{}",
            out.output
        );
    }

    #[test]
    fn hierarchical_across_two_pretend_hosts_of_two() {
        if no_gpu() {
            return;
        }
        // 2 hosts x 2 ranks, all on this GPU: IPC inside each pretend host, each rank's
        // half of the buffer through pinned memory and the host links. Every dtype and
        // op at awkward counts, #wrong = 0, and each rank's PCIe bytes within 1/2 of the
        // buffer + 5 % (an extra check); with the host collectives hierarchical too,
        // the random sums must have the host path's bits (another).
        let out = run(
            4,
            &[
                "--pretend-nodes",
                "2",
                "--counts",
                COUNTS,
                "--time",
                "1048579",
            ],
            &[("HETCCL_ALGO", "hier")],
        );
        assert_passed(&out, 4, "staged", 204, "hierarchical 2 x 2");
        assert!(
            out.output
                .contains("determinism f32 sum 1048579: host hierarchical all_reduce's bits"),
            "{}",
            out.output
        );
        assert_hierarchical(&out, 4, 1_048_579);
        // 1 MiB of scratch: 262144 f32 per window, so the largest count takes five
        // windows (each a hierarchical all-reduce of its own), the last one partial;
        // small chunks make each window's inter-host rings many messages.
        let env = [
            ("HETCCL_DEVICE_SCRATCH_BYTES", "1M"),
            ("HETCCL_CHUNK_BYTES", "40000"),
        ];
        let out = run(
            4,
            &[
                "--pretend-nodes",
                "2",
                "--counts",
                "1000,1048579",
                "--time",
                "1000",
            ],
            &env,
        );
        assert_passed(
            &out,
            4,
            "staged",
            137,
            "hierarchical 2 x 2 in 1 MiB windows",
        );
        // Asked for by name, the staged path stays flat: no link-bytes check.
        let out = run(
            4,
            &[
                "--path",
                "staged",
                "--pretend-nodes",
                "2",
                "--counts",
                "1000",
            ],
            &[],
        );
        assert_passed(&out, 4, "staged", 70, "flat staged 2 x 2");
        assert!(out.output.contains("on 4 ranks (staged)"), "{}", out.output);
    }

    /// Rank 3 of 4 (2 pretend hosts x 2) aborts while all run 64 MiB hierarchical
    /// all-reduces: its host-mate, whose copies to the host wait behind a device fence
    /// that rank 3 never reaches, or whose network ring waits for it, must fail naming
    /// it, and no rank may hang.
    #[test]
    fn a_dead_host_mate_is_named_on_the_hierarchical_path() {
        if no_gpu() {
            return;
        }
        let children = spawn_ranks(
            4,
            check_bin().to_str().expect("utf-8 path"),
            &[
                "--pretend-nodes",
                "2",
                "--counts",
                "1",
                "--time",
                "16777216",
                "--iters",
                "100000",
                "--die-after",
                "4",
            ],
            &[("HETCCL_TIMEOUT", "5")],
            |_| vec![],
        );
        let outs = collect(children, Duration::from_secs(60));
        for (r, o) in outs.iter().enumerate() {
            println!("rank {r}, {:?}:\n{}", o.elapsed, o.output);
            assert!(!o.hung, "rank {r} hung:\n{}", o.output);
        }
        assert!(
            outs[3].output.contains("rank 3: aborting on purpose"),
            "{}",
            outs[3].output
        );
        let o = &outs[2];
        assert_eq!(o.code, Some(1), "{}", o.output);
        assert!(
            o.output.contains("peer 3 is gone") || o.output.contains("waiting for peer 3"),
            "{}",
            o.output
        );
        for o in &outs[..3] {
            assert_eq!(o.code, Some(1), "{}", o.output);
            assert!(o.elapsed < Duration::from_secs(25), "{:?}", o.elapsed);
        }
    }

    #[test]
    fn ipc_refuses_ranks_on_other_hosts() {
        if no_gpu() {
            return;
        }
        let out = run(
            2,
            &["--path", "ipc", "--pretend-nodes", "2", "--counts", "8"],
            &[],
        );
        assert!(!out.hung, "hung:\n{}", out.output);
        assert_eq!(out.code, Some(1), "{}", out.output);
        // Whichever rank fails first stops the other, so only one message is certain.
        assert!(
            out.output
                .contains("CUDA IPC needs every rank on one host, but ranks "),
            "{}",
            out.output
        );
        assert!(
            out.output
                .contains("GPUs of different hosts need DevicePath::Staged"),
            "{}",
            out.output
        );
    }

    /// On a machine without a GPU the check itself must skip on every rank and succeed.
    #[test]
    fn the_check_skips_on_every_rank_without_a_gpu() {
        let Err(why) = hetccl::device::available() else {
            super::common::skip("a GPU is present: the other tests cover the check");
            return;
        };
        let out = run(2, &["--counts", "8"], &[]);
        assert_eq!(out.code, Some(0), "{}", out.output);
        assert_every_rank_printed(&out, 2, |r| format!("[rank {r}] skipping: {why}"));
    }
}
