//! `hetccl-gpu-check`: device collectives ([`DeviceComm`]) on every rank's GPU, checked
//! against values computed on the host. Start it on every rank:
//!
//! ```text
//! hetccl run -n 4 -- hetccl-gpu-check [--path auto|ipc|staged] [--counts 1,1000,1048579]
//!                                      [--time 1024,16777216] [--iters 5]
//! ```
//!
//! Rank r uses GPU `local_rank mod device count`, so several ranks share a GPU when there
//! are fewer GPUs than ranks. Inputs are small integers, so every reduction is exact in
//! f32, f16 and bf16 and must match bit for bit. A determinism check sums random f32
//! values twice and requires the same bits on every rank and in both runs (and, on the
//! IPC path, the bits of a host sum in rank order).
//!
//! Prints one table row per (collective, dtype, op, count) on rank 0 with `#wrong`
//! summed over all ranks, and on every rank `checks passed, #wrong=0` or `#wrong=N`.
//! Exits 1 on any wrong element or error, 0 otherwise; without a usable GPU it prints
//! `skipping: <reason>` and exits 0.
//!
//! Then it times an in-place f32 all-reduce sum of each count in `--time` (default: the
//! largest of `--counts`) and a reduce-scatter sum of the same message (`count / n`
//! elements per rank), median of `--iters` calls after one warm-up each, and rank 0
//! prints one line per collective and count with algbw and busbw (nccl-tests' factors
//! 2(n-1)/n and (n-1)/n).
//!
//! After every device collective of those checks it also requires
//! [`DeviceComm::link_bytes`] to be what [`device::device_link_bytes`] says for the call,
//! rank and path (the hierarchical all-reduce: its plan's,
//! [`DeviceHierPlan::link_bytes`], window by window), and the communicator's device
//! counters ([`hetccl::observe::Metrics`], classes `DeviceIpc` and `DeviceStaged`) to
//! have grown by exactly that; one `link bytes and counters` row per collective sums
//! the mismatches, and every rank prints its first one.
//!
//! `--pretend-nodes K` puts the ranks on K pretend hosts (`HETCCL_NODE_ID`), so `auto`
//! picks the staged path and `ipc` must refuse with a clear error. With `auto`, an
//! all-reduce across pretend hosts of which one holds two ranks runs hierarchically
//! (`staged-hier` in the timing lines; `--path staged` keeps it flat): then a further
//! check requires the bytes each rank moved over each link class in an all-reduce of
//! the largest count (of `--counts` and `--time`) to be the plan's, and, when the host
//! collectives are hierarchical too (`HETCCL_ALGO=hier`), the random sums to have the
//! bits of the host communicator's hierarchical all-reduce (PCIe at most 1/L of the buffer + 5 % each way,
//! L the ranks of its host), and every rank prints them.
//!
//! `--die-after SECS` makes the last rank abort its process that long after start, in
//! the middle of whatever it is doing (use a long `--time`/`--iters` run): the other
//! ranks must then fail with an error that names it, within `HETCCL_TIMEOUT`.
//! `--stall-gpu SECS` holds the last rank's stream for that long before its first
//! collective, as a hung kernel would, while its host goes on.
//!
//! `--capi` runs the same collectives through the C API's device calls instead
//! (`hetcclDeviceAllReduce` and the others on raw pointers and a stream of its own; see
//! `capi.rs`), with the checks only the C API needs: ordering on the caller's stream, and
//! buffers refused on every rank.

mod capi;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys;
use half::{bf16, f16};
use hetccl::algorithm::device_hier::DeviceHierPlan;
use hetccl::algorithm::Call;
use hetccl::config::AlgoChoice;
use hetccl::device::{
    self, CudaSlice, Device, DeviceAcrossHosts, DeviceComm, DevicePath, DeviceRoute, GpuElement,
    LinkBytes, Stream,
};
use hetccl::dtype::CollectiveOp;
use hetccl::observe::LinkClass;
use hetccl::{Communicator, Element, ReduceOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Args {
    path: DevicePath,
    counts: Vec<usize>,
    time: Option<Vec<usize>>,
    pretend_nodes: Option<usize>,
    iters: usize,
    die_after: Option<f64>,
    stall_gpu: Option<f64>,
    capi: bool,
}

const USAGE: &str = "usage: hetccl-gpu-check [--path auto|ipc|staged] [--counts 1,1000,1048579] \
                     [--time 1024,16777216] [--pretend-nodes K] [--iters N] [--die-after SECS] \
                     [--stall-gpu SECS] [--capi]";

fn parse_counts(flag: &str, v: &str) -> Result<Vec<usize>, String> {
    v.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("{flag} {v}: {e}"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        path: DevicePath::Auto,
        counts: vec![1, 1000, (1 << 20) + 3],
        time: None,
        pretend_nodes: None,
        iters: 5,
        die_after: None,
        stall_gpu: None,
        capi: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--path" => {
                let v = val()?;
                a.path = DevicePath::parse(&v)
                    .ok_or_else(|| format!("--path {v}: expected auto, ipc or staged"))?;
            }
            "--counts" => a.counts = parse_counts("--counts", &val()?)?,
            "--time" => a.time = Some(parse_counts("--time", &val()?)?),
            "--pretend-nodes" => {
                let k: usize = val()?
                    .parse()
                    .map_err(|e| format!("--pretend-nodes: {e}"))?;
                a.pretend_nodes = Some(k.max(1));
            }
            "--iters" => a.iters = val()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--die-after" => {
                a.die_after = Some(val()?.parse().map_err(|e| format!("--die-after: {e}"))?)
            }
            "--stall-gpu" => {
                a.stall_gpu = Some(val()?.parse().map_err(|e| format!("--stall-gpu: {e}"))?)
            }
            "--capi" => a.capi = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// Rank r's element i for `op`: small integers whose reduction over up to 8 ranks is
/// exact in bf16 (sums below 256, products powers of two up to 2^8).
fn input<T: Element>(op: ReduceOp, r: usize, i: usize) -> T {
    let v = match op {
        ReduceOp::Prod => 1 + (r + i) % 2,
        ReduceOp::Max | ReduceOp::Min => (5 * r + 3 * i) % 11,
        ReduceOp::Sum | ReduceOp::Avg => 1 + (r + 2 * i) % 9,
    };
    T::from_f64(v as f64)
}

/// The reduction of every rank's `input`, folded on the host in rank order.
fn expected<T: Element>(op: ReduceOp, i: usize, n: usize) -> T {
    hetccl::reduce::fold(op, (0..n).map(|r| input::<T>(op, r, i)), n)
        .expect("a world has at least one rank")
}

/// Broadcast and all-gather payload: rank r's element i.
fn payload<T: Element>(r: usize, i: usize) -> T {
    T::from_f64(((7 * r + i) % 200) as f64)
}

fn wrong<T: Element>(got: &[T], want: impl Fn(usize) -> T) -> u64 {
    got.iter()
        .enumerate()
        .filter(|(i, g)| **g != want(*i))
        .count() as u64
}

struct Check<'a> {
    dc: &'a mut DeviceComm,
    stream: &'a Stream,
    /// (what, elements wrong on this rank)
    rows: Vec<(String, u64)>,
    /// Every rank runs on the same GPU (an IPC all-reduce then takes one shot).
    shared_gpu: bool,
    /// Per collective: calls whose link bytes were checked, and of them those whose
    /// bytes or counters were wrong.
    moved: Vec<(CollectiveOp, u64, u64)>,
    /// This rank's first link-bytes mismatch, printed at the end.
    first_moved_wrong: Option<String>,
}

/// The communicator's device counters: bytes read over CUDA IPC, copied device to host,
/// copied host to device.
fn device_counters(comm: &Communicator) -> [u64; 3] {
    let m = comm.metrics();
    [
        m.received(LinkClass::DeviceIpc),
        m.sent(LinkClass::DeviceStaged),
        m.received(LinkClass::DeviceStaged),
    ]
}

type Res<T> = Result<T, String>;

fn err(what: &str) -> impl Fn(hetccl::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Check<'_> {
    fn upload<T: GpuElement>(&self, v: &[T]) -> Res<CudaSlice<T>> {
        self.stream.upload(v).map_err(|e| e.to_string())
    }

    fn download<T: GpuElement>(&self, d: &CudaSlice<T>) -> Res<Vec<T>> {
        self.stream.download(d).map_err(|e| e.to_string())
    }

    /// What `call` must have moved on this rank: the IPC or flat staged path's bytes
    /// ([`device::device_link_bytes`]), or the hierarchical plan's per window.
    fn expected_bytes(&self, call: &Call) -> LinkBytes {
        let (r, n) = (self.dc.rank(), self.dc.world_size());
        let cfg = self.dc.communicator().config();
        let hier = matches!(
            self.dc.across_hosts(),
            DeviceAcrossHosts::Hierarchical { .. }
        );
        let route = match self.dc.path() {
            DevicePath::Ipc => DeviceRoute::Ipc {
                scratch_bytes: cfg.device_scratch_bytes,
                one_shot_bytes: cfg.device_one_shot_bytes,
                shared_gpu: self.shared_gpu,
            },
            _ if hier && call.op == CollectiveOp::AllReduce && n > 1 => {
                let nodes = &self.dc.communicator().topology().nodes;
                let elem = call.dtype.size();
                let window = device::ipc_window(cfg.device_scratch_bytes, elem, 8);
                let mut plan = LinkBytes::default();
                for off in (0..call.count).step_by(window) {
                    let len = window.min(call.count - off);
                    let b = DeviceHierPlan::new(nodes, len, elem).link_bytes(r, elem);
                    plan.ipc_read += b.ipc_read;
                    plan.device_to_host += b.device_to_host;
                    plan.host_to_device += b.host_to_device;
                }
                return plan;
            }
            _ => DeviceRoute::Staged,
        };
        device::device_link_bytes(call, n, r, route)
    }

    /// After a device collective `call` that succeeded: `link_bytes()` must be what it
    /// should have moved, and the counters (`before` the call) must have grown by that.
    fn check_moved(&mut self, what: &str, call: Call, before: [u64; 3]) {
        let want = self.expected_bytes(&call);
        let mut got = self.dc.link_bytes();
        // The hierarchical rings' sends are checked by `link_bytes` against the plan,
        // within rounding; the other paths leave the host links to the host counters.
        let hier = call.op == CollectiveOp::AllReduce
            && matches!(
                self.dc.across_hosts(),
                DeviceAcrossHosts::Hierarchical { .. }
            );
        if hier {
            got.network_sent = 0;
        }
        let after = device_counters(self.dc.communicator());
        let grew = [0, 1, 2].map(|i| after[i].wrapping_sub(before[i]));
        let counted = [want.ipc_read, want.device_to_host, want.host_to_device].map(|b| b as u64);
        let bad = got != want || grew != counted;
        if bad && self.first_moved_wrong.is_none() {
            self.first_moved_wrong = Some(format!(
                "{what}: link_bytes {got:?}, expected {want:?}; counters (ipc, to host, to \
                 device) grew by {grew:?}, expected {counted:?}"
            ));
        }
        match self.moved.iter_mut().find(|(op, ..)| *op == call.op) {
            Some(row) => {
                row.1 += 1;
                row.2 += u64::from(bad);
            }
            None => self.moved.push((call.op, 1, u64::from(bad))),
        }
    }

    fn counters(&self) -> [u64; 3] {
        device_counters(self.dc.communicator())
    }

    fn dtype<T: GpuElement>(&mut self, count: usize) -> Res<()> {
        let (r, n) = (self.dc.rank(), self.dc.world_size());
        let name = T::DTYPE.name();
        for op in ReduceOp::ALL {
            let host: Vec<T> = (0..count).map(|i| input(op, r, i)).collect();

            let what = format!("all_reduce {name} {op} {count}");
            let mut buf = self.upload(&host)?;
            let before = self.counters();
            self.dc
                .all_reduce(self.stream, &mut buf, op)
                .map_err(err(&what))?;
            let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, count);
            self.check_moved(&what, call, before);
            let got = self.download(&buf)?;
            self.rows
                .push((what, wrong(&got, |i| expected::<T>(op, i, n))));

            // Out of place, both buffers one element off their allocation (the kernels'
            // scalar path), with a guard element after the output that must survive.
            let what = format!("all_reduce_into {name} {op} {count}");
            let mut padded = vec![T::from_f64(0.0)];
            padded.extend_from_slice(&host);
            let send = self.upload(&padded)?;
            let guard = T::from_f64(-3.0);
            let mut out = self.upload(&vec![guard; count + 2])?;
            {
                let send_v = send.slice(1..);
                let mut out_v = out.slice_mut(1..count + 1);
                let before = self.counters();
                self.dc
                    .all_reduce_into(self.stream, &send_v, &mut out_v, op)
                    .map_err(err(&what))?;
                let call = Call::new(CollectiveOp::AllReduce, T::DTYPE, count);
                self.check_moved(&what, call, before);
            }
            let got = self.download(&out)?;
            let bad = wrong(&got, |i| {
                if i == 0 || i == count + 1 {
                    guard
                } else {
                    expected::<T>(op, i - 1, n)
                }
            });
            self.rows.push((what, bad));

            // Reduce-scatter: rank r's recv is block r of every rank's send, reduced.
            let what = format!("reduce_scatter {name} {op} {count}");
            let send = self.upload(&(0..n * count).map(|i| input(op, r, i)).collect::<Vec<T>>())?;
            let mut recv = self.upload(&vec![T::from_f64(-1.0); count])?;
            let before = self.counters();
            self.dc
                .reduce_scatter(self.stream, &send, &mut recv, op)
                .map_err(err(&what))?;
            let call = Call::new(CollectiveOp::ReduceScatter, T::DTYPE, count);
            self.check_moved(&what, call, before);
            let got = self.download(&recv)?;
            self.rows
                .push((what, wrong(&got, |i| expected::<T>(op, r * count + i, n))));

            // Reduce to a root that moves with the op; the other ranks' recv stays as it
            // was.
            let root = (count + op as usize) % n;
            let what = format!("reduce {name} {op} root {root} {count}");
            let send = self.upload(&host)?;
            let mut recv = self.upload(&vec![guard; count])?;
            let before = self.counters();
            self.dc
                .reduce(self.stream, &send, &mut recv, op, root)
                .map_err(err(&what))?;
            let call = Call::new(CollectiveOp::Reduce, T::DTYPE, count).with_root(root);
            self.check_moved(&what, call, before);
            let got = self.download(&recv)?;
            let bad = wrong(&got, |i| {
                if r == root {
                    expected::<T>(op, i, n)
                } else {
                    guard
                }
            });
            self.rows.push((what, bad));
        }

        let root = (count + 1) % n;
        let what = format!("broadcast {name} root {root} {count}");
        let mine: Vec<T> = if r == root {
            (0..count).map(|i| payload(root, i)).collect()
        } else {
            vec![T::from_f64(-1.0); count]
        };
        let mut buf = self.upload(&mine)?;
        let before = self.counters();
        self.dc
            .broadcast(self.stream, &mut buf, root)
            .map_err(err(&what))?;
        let call = Call::new(CollectiveOp::Broadcast, T::DTYPE, count).with_root(root);
        self.check_moved(&what, call, before);
        let got = self.download(&buf)?;
        self.rows
            .push((what, wrong(&got, |i| payload::<T>(root, i))));

        let what = format!("all_gather {name} {count}");
        let send = self.upload(&(0..count).map(|i| payload(r, i)).collect::<Vec<T>>())?;
        let mut recv = self.upload(&vec![T::from_f64(-1.0); n * count])?;
        let before = self.counters();
        self.dc
            .all_gather(self.stream, &send, &mut recv)
            .map_err(err(&what))?;
        let call = Call::new(CollectiveOp::AllGather, T::DTYPE, count);
        self.check_moved(&what, call, before);
        let got = self.download(&recv)?;
        self.rows.push((
            what,
            wrong(&got, |j| payload::<T>(j / count.max(1), j % count.max(1))),
        ));
        Ok(())
    }

    /// Calls that a rank refuses: every rank must return an error that says why, and the
    /// `DeviceComm` must stay usable (an all-reduce after them is checked).
    fn refusals(&mut self) -> Res<()> {
        let (r, n) = (self.dc.rank(), self.dc.world_size());
        // The last rank's send is one element short of n blocks of 4.
        let send = self.upload(&vec![1.0f32; if r + 1 == n { 4 * n - 1 } else { 4 * n }])?;
        let mut recv = self.upload(&[0.0f32; 4])?;
        let before = self.counters();
        let got = self
            .dc
            .reduce_scatter(self.stream, &send, &mut recv, ReduceOp::Sum);
        let nothing = self.dc.link_bytes() == LinkBytes::default() && self.counters() == before;
        self.rows.push((
            "refused reduce_scatter moved and counted nothing".into(),
            u64::from(!nothing),
        ));
        let want = if r + 1 == n {
            vec!["device buffer too small: send holds".to_string()]
        } else {
            vec![
                format!("peer {} refused its #", n - 1),
                "reduce_scatter".into(),
            ]
        };
        let bad = match got {
            Ok(()) => 1,
            Err(e) if want.iter().all(|w| e.to_string().contains(w.as_str())) => 0,
            Err(e) => {
                println!("rank {r}: reduce_scatter refusal said {e:?}, expected {want:?}");
                1
            }
        };
        self.rows
            .push(("refused reduce_scatter (send too small)".into(), bad));

        // A root outside the world: every rank refuses on its own.
        let got = self
            .dc
            .reduce(self.stream, &send, &mut recv, ReduceOp::Sum, n);
        let want = format!("root {n} is not a rank of a world of {n}");
        let bad = match got {
            Ok(()) => 1,
            Err(e) if e.to_string().contains(&want) => 0,
            Err(e) => {
                println!("rank {r}: reduce refusal said {e:?}, expected {want:?}");
                1
            }
        };
        let mut buf = self.upload(&[1.0f32; 4])?;
        let after = self.dc.all_reduce(self.stream, &mut buf, ReduceOp::Sum);
        let sums = self.download(&buf)?;
        let usable = after.is_ok() && sums.iter().all(|&x| x == n as f32);
        self.rows.push((
            "refused reduce (bad root), then all_reduce".into(),
            bad + u64::from(!usable),
        ));
        Ok(())
    }

    /// Random f32 sums: the same bits twice, on every rank, and (IPC) equal to a host
    /// fold in rank order.
    fn determinism(&mut self, count: usize) -> Res<()> {
        let (r, n) = (self.dc.rank(), self.dc.world_size());
        let inputs = |q: usize| -> Vec<f32> {
            let mut rng = StdRng::seed_from_u64(1000 + q as u64);
            (0..count).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
        };
        let send = self.upload(&inputs(r))?;
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut out = self.upload(&vec![0.0f32; count])?;
            self.dc
                .all_reduce_into(self.stream, &send, &mut out, ReduceOp::Sum)
                .map_err(err("determinism all_reduce"))?;
            runs.push(self.download(&out)?);
        }
        let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
        let what = format!("determinism f32 sum {count}: run to run");
        let (a, b) = (bits(&runs[0]), bits(&runs[1]));
        self.rows.push((
            what,
            a.iter().zip(&b).filter(|(x, y)| x != y).count() as u64,
        ));

        // FNV-1a of the bits, gathered: every rank must hold the same result.
        let hash = a.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut hashes = vec![0u64; n];
        self.dc
            .communicator()
            .all_gather(&[hash], &mut hashes)
            .map_err(err("gather result hashes"))?;
        self.rows.push((
            format!("determinism f32 sum {count}: across ranks"),
            hashes.iter().filter(|h| **h != hashes[0]).count() as u64,
        ));

        // Hierarchical across hosts, with the host collectives hierarchical too
        // (HETCCL_ALGO=hier): the same shards, sums and rings, so the same bits.
        let comm = self.dc.communicator().clone();
        if matches!(
            self.dc.across_hosts(),
            DeviceAcrossHosts::Hierarchical { .. }
        ) && comm.config().algo == AlgoChoice::Hier
        {
            let mut host = inputs(r);
            comm.all_reduce(&mut host, ReduceOp::Sum)
                .map_err(err("host hierarchical all_reduce"))?;
            self.rows.push((
                format!("determinism f32 sum {count}: host hierarchical all_reduce's bits"),
                a.iter().zip(&bits(&host)).filter(|(x, y)| x != y).count() as u64,
            ));
        }

        if self.dc.path() == DevicePath::Ipc {
            let all: Vec<Vec<f32>> = (0..n).map(inputs).collect();
            let want: Vec<u32> = (0..count)
                .map(|i| {
                    all[1..]
                        .iter()
                        .fold(all[0][i], |acc, v| acc + v[i])
                        .to_bits()
                })
                .collect();
            self.rows.push((
                format!("determinism f32 sum {count}: rank-order host sum"),
                a.iter().zip(&want).filter(|(x, y)| x != y).count() as u64,
            ));
        }
        Ok(())
    }

    /// On the hierarchical path: the bytes an all-reduce of `count` f32 moved over each
    /// link class, against the plan's; PCIe within 1/L of the buffer + 5 % each way.
    fn link_bytes(&mut self, count: usize) -> Res<()> {
        let r = self.dc.rank();
        let mut buf = self.upload(&vec![1.0f32; count])?;
        self.dc
            .all_reduce(self.stream, &mut buf, ReduceOp::Sum)
            .map_err(err("all_reduce for the link counters"))?;
        let got = self.dc.link_bytes();
        let nodes = self.dc.communicator().topology().nodes.clone();
        let l = nodes.iter().find(|n| n.contains(&r)).map_or(1, |n| n.len());
        // The plan of each window of HETCCL_DEVICE_SCRATCH_BYTES, as the path runs them.
        let scratch = self.dc.communicator().config().device_scratch_bytes;
        let window = (scratch / 4 / 8 * 8).max(8);
        let mut plan = hetccl::device::LinkBytes::default();
        for off in (0..count).step_by(window) {
            let b = DeviceHierPlan::new(&nodes, window.min(count - off), 4).link_bytes(r, 4);
            plan.ipc_read += b.ipc_read;
            plan.device_to_host += b.device_to_host;
            plan.host_to_device += b.host_to_device;
            plan.network_sent += b.network_sent;
        }
        let bytes = (count * 4) as f64;
        let limit = bytes / l as f64 * 1.05;
        println!(
            "rank {r}: hierarchical all_reduce of {} bytes moved ipc {} B, device->host {} B,              host->device {} B, network {} B (plan: {} / {} / {} / {}; PCIe limit {limit:.0} B)",
            count * 4,
            got.ipc_read,
            got.device_to_host,
            got.host_to_device,
            got.network_sent,
            plan.ipc_read,
            plan.device_to_host,
            plan.host_to_device,
            plan.network_sent
        );
        let net_off = (got.network_sent as f64 - plan.network_sent as f64).abs();
        let bad = u64::from(got.ipc_read != plan.ipc_read)
            + u64::from(got.device_to_host != plan.device_to_host)
            + u64::from(got.host_to_device != plan.host_to_device)
            + u64::from(got.device_to_host as f64 > limit)
            + u64::from(net_off > 0.01 * plan.network_sent as f64 + 64.0);
        self.rows.push((
            format!("hierarchical link bytes f32 {count} (PCIe <= 1/{l} + 5%)"),
            bad,
        ));
        Ok(())
    }

    /// Median times, in seconds, of `iters` in-place f32 all-reduce sums of `count`
    /// elements and of `iters` f32 reduce-scatter sums of `count / n` elements per rank
    /// (each after one warm-up).
    fn time(&mut self, count: usize, iters: usize) -> Res<(f64, f64)> {
        fn median(mut times: Vec<f64>) -> f64 {
            times.remove(0);
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        }
        let mut buf = self.upload(&vec![1.0f32; count])?;
        let mut times = Vec::new();
        for _ in 0..iters.max(1) + 1 {
            let t = Instant::now();
            self.dc
                .all_reduce(self.stream, &mut buf, ReduceOp::Sum)
                .map_err(err("timed all_reduce"))?;
            times.push(t.elapsed().as_secs_f64());
        }
        let all_reduce = median(times);

        let per = (count / self.dc.world_size()).max(1);
        let send = self.upload(&vec![1.0f32; per * self.dc.world_size()])?;
        let mut recv = self.upload(&vec![0.0f32; per])?;
        let mut times = Vec::new();
        for _ in 0..iters.max(1) + 1 {
            let t = Instant::now();
            self.dc
                .reduce_scatter(self.stream, &send, &mut recv, ReduceOp::Sum)
                .map_err(err("timed reduce_scatter"))?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok((all_reduce, median(times)))
    }
}

/// Queues on `stream` a wait for a device word that a thread sets `secs` later, from a
/// stream of its own: everything queued on `stream` meanwhile waits, as behind a hung
/// kernel.
fn stall(dev: &Device, stream: &Stream, secs: f64) -> Res<()> {
    hold_raw(dev, stream.cuda().cu_stream(), secs)
}

/// Holds the raw stream `held` for `secs`: it waits on a word that another stream sets
/// that much later.
fn hold_raw(dev: &Device, held: sys::CUstream, secs: f64) -> Res<()> {
    use cudarc::driver::result;
    let ctx = dev.context().clone();
    let release = ctx
        .new_stream()
        .map_err(|e| format!("create stream: {e}"))?;
    // cuMemAlloc memory: stream memory operations refuse the stream-ordered pool's.
    // SAFETY: a plain 4-byte allocation, zeroed before the wait is queued; it is never
    // freed, as the held stream may read it until the process ends.
    let ptr = unsafe {
        let ptr = result::malloc_sync(4).map_err(|e| format!("allocate: {e}"))?;
        sys::cuMemsetD32Async(ptr, 0, 1, release.cu_stream())
            .result()
            .and_then(|()| release.synchronize())
            .map_err(|e| format!("zero the word: {e}"))?;
        sys::cuStreamWaitValue32_v2(
            held,
            ptr,
            1,
            sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
        )
        .result()
        .map_err(|e| format!("hold the stream: {e}"))?;
        ptr
    };
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        let set = ctx.bind_to_thread().and_then(|()| {
            // SAFETY: the word is alive (never freed) and 4 bytes long.
            unsafe { sys::cuMemsetD32Async(ptr, 1, 1, release.cu_stream()) }.result()?;
            release.synchronize()
        });
        if let Err(e) = set {
            eprintln!("releasing the held stream: {e}");
        }
    });
    Ok(())
}

/// `staged`, `staged-hier` (all-reduces hierarchical across hosts), or `ipc-device` /
/// `ipc-host` after the IPC path's kind of fence
/// (`HETCCL_DEVICE_FENCE`).
fn path_label(dc: &DeviceComm) -> String {
    match (dc.path(), dc.across_hosts()) {
        (DevicePath::Ipc, _) => {
            format!("ipc-{}", dc.communicator().config().device_fence.name())
        }
        (_, DeviceAcrossHosts::Hierarchical { .. }) => "staged-hier".to_string(),
        (p, _) => p.to_string(),
    }
}

fn run(args: &Args) -> Res<bool> {
    let comm = Arc::new(Communicator::init_from_env().map_err(err("init"))?);
    let (r, n) = (comm.rank(), comm.world_size());
    let devices = device::available().map_err(|e| format!("no GPU after all: {e}"))?;
    let ordinal = comm.local_rank() % devices;
    let dev = Device::open(ordinal).map_err(err("open device"))?;
    let stream = dev.new_stream().map_err(err("create stream"))?;
    let mut dc = DeviceComm::with_path(comm.clone(), &dev, args.path).map_err(err("DeviceComm"))?;
    if let Some(secs) = args.stall_gpu.filter(|_| r + 1 == n) {
        stall(&dev, &stream, secs)?;
        println!("rank {r}: stream held for {secs} s");
    }
    if let Some(secs) = args.die_after.filter(|_| r + 1 == n) {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs_f64(secs));
            eprintln!("rank {r}: aborting on purpose (--die-after {secs})");
            std::process::abort();
        });
    }
    println!(
        "rank {r}/{n}: device {ordinal} ({}), path {}",
        dev.name(),
        dc.path()
    );

    // Ranks of one host on the same ordinal share one GPU (the IPC path's case).
    let mut ordinals = vec![0u64; n];
    comm.all_gather(&[ordinal as u64], &mut ordinals)
        .map_err(err("gather device ordinals"))?;
    let mut ck = Check {
        dc: &mut dc,
        stream: &stream,
        rows: Vec::new(),
        shared_gpu: ordinals.iter().all(|&o| o == ordinals[0]),
        moved: Vec::new(),
        first_moved_wrong: None,
    };
    for &count in &args.counts {
        ck.dtype::<f32>(count)?;
        ck.dtype::<f16>(count)?;
        ck.dtype::<bf16>(count)?;
    }
    for (op, calls, bad) in std::mem::take(&mut ck.moved) {
        ck.rows.push((
            format!("link bytes and counters: {} ({calls} calls)", op.name()),
            bad,
        ));
    }
    if let Some(first) = ck.first_moved_wrong.take() {
        println!("rank {r}: {first}");
    }
    let largest = args.counts.iter().copied().max().unwrap_or(1).max(1);
    ck.determinism(largest)?;
    if matches!(ck.dc.across_hosts(), DeviceAcrossHosts::Hierarchical { .. }) {
        // The largest message of the run, timed ones included.
        let most = args.time.iter().flatten().fold(largest, |m, &c| m.max(c));
        ck.link_bytes(most)?;
    }
    if n > 1 {
        ck.refusals()?;
    }
    let timed = args.time.clone().unwrap_or_else(|| vec![largest]);
    let mut secs = Vec::with_capacity(timed.len());
    for &count in &timed {
        secs.push(ck.time(count.max(1), args.iters)?);
    }
    let rows = std::mem::take(&mut ck.rows);

    let mut wrong: Vec<u64> = rows.iter().map(|(_, w)| *w).collect();
    comm.all_reduce(&mut wrong, ReduceOp::Sum)
        .map_err(err("sum the wrong counts"))?;
    let total: u64 = wrong.iter().sum();
    if r == 0 {
        println!("{:<56} {:>7}", "# check", "#wrong");
        for ((what, _), w) in rows.iter().zip(&wrong) {
            println!("{what:<56} {w:>7}");
        }
        // busbw as nccl-tests counts it: algbw x 2(n-1)/n for an all-reduce and x (n-1)/n
        // for a reduce-scatter, whose size is that of the send buffer.
        let factor = (n as f64 - 1.0) / n as f64;
        for (&count, &(ar, rs)) in timed.iter().zip(&secs) {
            let count = count.max(1);
            let algbw = (count * 4) as f64 / ar / 1e9;
            println!(
                "all_reduce f32 sum {count} elements on {n} ranks ({}): {:.1} us, algbw {algbw:.2} GB/s, busbw {:.2} GB/s",
                path_label(&dc),
                ar * 1e6,
                algbw * 2.0 * factor
            );
            let sent = (count / n).max(1) * n;
            let algbw = (sent * 4) as f64 / rs / 1e9;
            println!(
                "reduce_scatter f32 sum {sent} elements on {n} ranks ({}): {:.1} us, algbw {algbw:.2} GB/s, busbw {:.2} GB/s",
                path_label(&dc),
                rs * 1e6,
                algbw * factor
            );
        }
    }
    println!(
        "rank {r}/{n}: {} checks passed, #wrong={total} (path {}, scratch {} bytes)",
        rows.len(),
        dc.path(),
        dc.scratch_bytes()
    );
    Ok(total == 0)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hetccl-gpu-check: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(why) = device::available() {
        println!("skipping: {why}");
        return ExitCode::SUCCESS;
    }
    if let Some(k) = args.pretend_nodes {
        // Before the communicator reads its configuration from the environment.
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
        };
        let (rank, world) = (var("RANK").unwrap_or(0), var("WORLD_SIZE").unwrap_or(1));
        std::env::set_var(
            "HETCCL_NODE_ID",
            format!("gpu-check-node-{}", rank * k / world.max(1)),
        );
    }
    let outcome = if args.capi {
        capi::run(&args.counts)
    } else {
        run(&args)
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("hetccl-gpu-check: some results were wrong (see #wrong above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("hetccl-gpu-check: {e}");
            ExitCode::from(1)
        }
    }
}
