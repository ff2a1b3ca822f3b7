//! Collectives through the real communicator, executor and links, with the ranks as
//! threads of one process.
//!
//! `Communicator::init_from_env` needs one process per rank, which criterion cannot
//! drive; [`Communicator::from_parts`] takes links built here instead, so each rank is
//! a thread with its own communicator (and its own progress thread) over:
//!
//! - `mem`: the in-process queue link (the executor's cost without a transport),
//! - `shm`: real shared-memory segments in /dev/shm, the same rings two processes use,
//! - `tcp`: real loopback sockets, `nsocks_per_peer` per pair, striped.
//!
//! What differs from separate processes: one address space (no effect on the shm or
//! TCP data path, both copy through their segment or the kernel) and one scheduler
//! domain. Throughput is the collective's algbw bytes (the whole vector; busbw is that
//! times 2(n-1)/n for all_reduce, (n-1)/n for reduce_scatter and all_gather). For
//! process-per-rank numbers use `hetccl-perf` under `hetccl run` (scripts/compare-mpi.sh).
//!
//! ```text
//! cargo bench --bench collectives            # all
//! cargo bench --bench collectives -- all_reduce/shm
//! ```

use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hetccl::config::AlgoChoice;
use hetccl::dtype::CollectiveOp;
use hetccl::topology::{RankInfo, Topology};
use hetccl::transport::{mem, shm, tcp, Link};
use hetccl::{Communicator, Config, ReduceOp};

/// Ranks per world: the machine this was written on has two cores.
const RANKS: usize = 2;
const SIZES: [usize; 3] = [4 << 10, 1 << 20, 16 << 20];
const COLLECTIVES: [CollectiveOp; 4] = [
    CollectiveOp::AllReduce,
    CollectiveOp::ReduceScatter,
    CollectiveOp::AllGather,
    CollectiveOp::Broadcast,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum LinkType {
    Mem,
    Shm,
    Tcp,
}

impl LinkType {
    fn name(self) -> &'static str {
        match self {
            LinkType::Mem => "mem",
            LinkType::Shm => "shm",
            LinkType::Tcp => "tcp",
        }
    }
}

type Links = Vec<Option<Box<dyn Link>>>;

/// Full mesh of `n` ranks: `out[r][p]` is rank r's link to p.
#[allow(clippy::needless_range_loop)] // pairs (a, b) index both ends
fn connect(kind: LinkType, n: usize, cfg: &Config) -> Vec<Links> {
    let mut out: Vec<Links> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    // The rank threads share this host's CPUs as a host's ranks would.
    let oversubscribed = n > std::thread::available_parallelism().map_or(1, |c| c.get());
    for a in 0..n {
        for b in a + 1..n {
            let (la, lb): (Box<dyn Link>, Box<dyn Link>) = match kind {
                LinkType::Mem => {
                    let (x, y) = mem::pair(a, b);
                    (Box::new(x), Box::new(y))
                }
                LinkType::Shm => {
                    let name = shm::segment_name("bench", a, b);
                    let mut x = shm::ShmLink::create(
                        &name,
                        a,
                        b,
                        shm::ShmGeometry::from_config(cfg, oversubscribed),
                    )
                    .expect("creating a shm segment (is /dev/shm writable?)");
                    let y = shm::ShmLink::open(&name, b, a).expect("opening the shm segment");
                    x.unlink();
                    (Box::new(x), Box::new(y))
                }
                LinkType::Tcp => {
                    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1");
                    let addr = l.local_addr().expect("listener address");
                    let (mut xs, mut ys) = (Vec::new(), Vec::new());
                    // Sequential connect/accept keeps socket k paired with socket k.
                    for _ in 0..cfg.nsocks_per_peer {
                        ys.push(TcpStream::connect(addr).expect("connecting on loopback"));
                        xs.push(l.accept().expect("accepting on loopback").0);
                    }
                    let stripe = tcp::stripe_bytes(cfg);
                    let x = tcp::TcpLink::new(a, b, xs, stripe).expect("tcp link");
                    let y = tcp::TcpLink::new(b, a, ys, stripe).expect("tcp link");
                    (Box::new(x), Box::new(y))
                }
            };
            out[a][b] = Some(la);
            out[b][a] = Some(lb);
        }
    }
    out
}

enum Cmd {
    Run {
        coll: CollectiveOp,
        bytes: usize,
        iters: u64,
    },
}

/// `RANKS` threads, each holding a communicator, driven by commands.
struct World {
    cmds: Vec<mpsc::Sender<Cmd>>,
    times: mpsc::Receiver<Duration>,
    threads: Vec<JoinHandle<()>>,
}

impl World {
    fn start(kind: LinkType) -> World {
        let cfg = Config {
            algo: AlgoChoice::Ring,
            ..Config::default()
        };
        let topo = Topology::from_ranks(
            (0..RANKS)
                .map(|rank| RankInfo {
                    rank,
                    hostname: "bench".into(),
                    node_id: "bench".into(),
                    pid: std::process::id(),
                    device: hetccl::topology::Device::Cpu,
                    cpus: 0,
                })
                .collect(),
        );
        let max = *SIZES.iter().max().unwrap_or(&0) / 4;
        let (time_tx, times) = mpsc::channel();
        let mut cmds = Vec::new();
        let mut threads = Vec::new();
        for (rank, links) in connect(kind, RANKS, &cfg).into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<Cmd>();
            cmds.push(tx);
            let comm = Communicator::from_parts(cfg.clone(), topo.clone(), rank, links, None)
                .expect("communicator from links");
            let time_tx = time_tx.clone();
            threads.push(std::thread::spawn(move || {
                let n = comm.world_size();
                // f32 buffers touched once, reused by every sample.
                let mut send = vec![1.0f32; max];
                let mut recv = vec![0.0f32; max];
                while let Ok(Cmd::Run { coll, bytes, iters }) = rx.recv() {
                    let count = bytes / 4;
                    let block = count / n;
                    comm.barrier().expect("barrier");
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        let r = match coll {
                            CollectiveOp::AllReduce => {
                                comm.all_reduce(&mut recv[..count], ReduceOp::Sum)
                            }
                            CollectiveOp::ReduceScatter => comm.reduce_scatter(
                                &send[..block * n],
                                &mut recv[..block],
                                ReduceOp::Sum,
                            ),
                            CollectiveOp::AllGather => {
                                comm.all_gather(&send[..block], &mut recv[..block * n])
                            }
                            _ => comm.broadcast(&mut send[..count], 0),
                        };
                        r.expect("collective");
                    }
                    let _ = time_tx.send(t0.elapsed());
                }
            }));
        }
        World {
            cmds,
            times,
            threads,
        }
    }

    /// Runs `iters` collectives on every rank; the slowest rank's time.
    fn run(&self, coll: CollectiveOp, bytes: usize, iters: u64) -> Duration {
        for c in &self.cmds {
            c.send(Cmd::Run { coll, bytes, iters })
                .expect("rank thread alive");
        }
        (0..RANKS)
            .map(|_| self.times.recv().expect("rank thread alive"))
            .max()
            .unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.cmds.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn label(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{}MiB", bytes >> 20)
    } else {
        format!("{}KiB", bytes >> 10)
    }
}

fn collectives(c: &mut Criterion) {
    for kind in [LinkType::Mem, LinkType::Shm, LinkType::Tcp] {
        let world = World::start(kind);
        for coll in COLLECTIVES {
            let mut g = c.benchmark_group(format!("{}/{}", coll.name(), kind.name()));
            for bytes in SIZES {
                g.throughput(Throughput::Bytes(bytes as u64));
                g.bench_function(BenchmarkId::from_parameter(label(bytes)), |b| {
                    b.iter_custom(|iters| world.run(coll, bytes, iters))
                });
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = collectives
}
criterion_main!(benches);
