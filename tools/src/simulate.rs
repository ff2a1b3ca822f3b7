//! `hetccl simulate CLUSTER [JOB OPTIONS]`: predicts a data-parallel training step on a
//! cluster that may not exist yet, for each of hetccl's strategies side by side.
//!
//! The cluster file (JSON) uses the topology file's words for links (`shm`, `tcp`,
//! `nvlink`, `pcie`, `rdma`; `latency_us`, `gb_per_s`):
//!
//! ```json
//! {
//!   "oversubscription": 1.0,
//!   "local_gb_per_s": 5.0,
//!   "nodes": [
//!     {"node_id": "v100", "count": 2, "ranks": 4, "device": "cuda",
//!      "samples_per_s": 12.3,
//!      "intra": {"class": "nvlink", "latency_us": 3.0, "gb_per_s": 100.0},
//!      "nic": {"latency_us": 30.0, "gb_per_s": 1.25}}
//!   ]
//! }
//! ```
//!
//! A node gives its ranks' training speed for the model as `samples_per_s` (measured)
//! or `tflops` (sustained, with the job's FLOPs per sample); `count` repeats it. The
//! step, per rank `r` with `b_r` samples per micro-batch at speed `v_r`:
//!
//! ```text
//! micro-batch time t_r = b_r / v_r; a step is update_freq micro-batches
//! forward takes 1/3 of t_r, backward 2/3, handing out gradient buckets in order
//!   (bucket k when its share of the parameters is done)
//! bucket k's all-reduce starts on rank r at max(bucket k ready on r, bucket k-1 done on r),
//!   played by the timed simulation (hetccl_testkit::timed) with the runtime's selection
//! step = the last rank's end of the last bucket
//! ```
//!
//! Strategies: the flat ring with equal batches (what plain DDP over NCCL runs), the
//! hierarchy, the hierarchy with fp16 between nodes, the hierarchy with batches in
//! proportion to speed, and all three. Each is shown for the first 1, 2, 4, ... nodes of
//! the file (and all of them), weak scaling (`--batch-per-rank`) or strong
//! (`--global-batch`).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use hetccl::algorithm::cost::LinkCost;
use hetccl::config::{AlgoChoice, CompressMode};
use hetccl::topology::LinkClass;
use hetccl_testkit::timed::{self, Knobs, Net, NodeNet};
use serde::Deserialize;

/// Usage of `hetccl simulate`.
pub const USAGE: &str = "\
usage: hetccl simulate CLUSTER.json [--job JOB.json] [--model NAME | --params P --flops-per-sample F]
                       [--batch-per-rank B | --global-batch G] [--update-freq U] [--bucket-mb M]
                       [--png FILE]

  CLUSTER.json       nodes, their ranks' speed, intra-node links, NICs (see docs/MODEL.md)
  --job FILE         the job's options as JSON keys (model, params, flops_per_sample,
                     batch_per_rank, global_batch, update_freq, bucket_mb); flags override
  --model NAME       bert-tiny, bert-mini, bert-small or bert-base (sequence 128)
  --params P         parameters (f32 gradients, 4 bytes each)
  --flops-per-sample F  training FLOPs per sample (needed by nodes given in tflops)
  --batch-per-rank B samples per rank per micro-batch (weak scaling; default 32)
  --global-batch G   samples per micro-batch over all ranks (strong scaling)
  --update-freq U    micro-batches per step, gradients all-reduced after the last (default 1)
  --bucket-mb M      gradient bucket, MiB (default 25)
  --png FILE         speedup against nodes per strategy, as a PNG";

/// A link's figures as the cluster file gives them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Link class (intra-node links; default `shm`).
    #[serde(default)]
    pub class: Option<LinkClass>,
    /// One-way latency, µs (default: the class's nominal).
    #[serde(default)]
    pub latency_us: Option<f64>,
    /// Bandwidth each way, GB/s (10^9 bytes; default: the class's nominal).
    #[serde(default)]
    pub gb_per_s: Option<f64>,
}

/// One node (or `count` alike) of the cluster file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Name.
    pub node_id: String,
    /// Nodes alike (default 1).
    #[serde(default)]
    pub count: Option<usize>,
    /// Ranks on the node.
    pub ranks: usize,
    /// `cpu` or `cuda` (default `cpu`).
    #[serde(default)]
    pub device: Option<String>,
    /// Each rank's training speed for the model, samples/s.
    #[serde(default)]
    pub samples_per_s: Option<f64>,
    /// Each rank's sustained TFLOP/s (with the job's FLOPs per sample).
    #[serde(default)]
    pub tflops: Option<f64>,
    /// Links between its ranks.
    #[serde(default)]
    pub intra: Option<LinkSpec>,
    /// Its NIC (default: TCP's nominal figures).
    #[serde(default)]
    pub nic: Option<LinkSpec>,
}

/// The cluster file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Nodes in rank order.
    pub nodes: Vec<NodeSpec>,
    /// Switch oversubscription (default 1: non-blocking).
    #[serde(default)]
    pub oversubscription: Option<f64>,
    /// Local copy and reduction speed per rank, GB/s (default: free).
    #[serde(default)]
    pub local_gb_per_s: Option<f64>,
}

/// The job's options (a job file's keys).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Trainer preset.
    #[serde(default)]
    pub model: Option<String>,
    /// Parameters.
    #[serde(default)]
    pub params: Option<f64>,
    /// Training FLOPs per sample.
    #[serde(default)]
    pub flops_per_sample: Option<f64>,
    /// Samples per rank per micro-batch.
    #[serde(default)]
    pub batch_per_rank: Option<usize>,
    /// Samples per micro-batch over all ranks.
    #[serde(default)]
    pub global_batch: Option<usize>,
    /// Micro-batches per step.
    #[serde(default)]
    pub update_freq: Option<usize>,
    /// Gradient bucket, MiB.
    #[serde(default)]
    pub bucket_mb: Option<f64>,
}

/// One rank's compute speed and its node.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// The network.
    pub net: Net,
    /// Samples per second of each rank.
    pub speed: Vec<f64>,
}

/// A trainer preset's parameters and training FLOPs per sample (sequence 128): the
/// trainer's BERT (embeddings, `L` layers of attention and FFN, the MLM head), and
/// `6 · params · seq` FLOPs plus attention's `12 · L · seq² · H`.
pub fn preset(name: &str) -> Option<(f64, f64)> {
    let (l, h) = match name {
        "bert-tiny" => (2.0, 128.0),
        "bert-mini" => (4.0, 256.0),
        "bert-small" => (4.0, 512.0),
        "bert-base" => (12.0, 768.0),
        _ => return None,
    };
    let (vocab, pos, seq) = (30522.0, 512.0, 128.0);
    let f = 4.0 * h;
    let embed = (vocab + pos + 2.0) * h + 2.0 * h;
    let layer = 4.0 * h * h + 4.0 * h + 2.0 * h * f + f + h + 4.0 * h;
    let head = h * h + h + 2.0 * h + vocab;
    let params = embed + l * layer + head;
    let flops = 6.0 * params * seq + 12.0 * l * seq * seq * h;
    Some((params, flops))
}

fn link(
    spec: Option<&LinkSpec>,
    default: LinkClass,
    what: &str,
) -> Result<(LinkClass, LinkCost), String> {
    let class = spec.and_then(|s| s.class).unwrap_or(default);
    let nominal = class.nominal();
    let lat = spec
        .and_then(|s| s.latency_us)
        .map(|u| u * 1e-6)
        .unwrap_or(nominal.latency_s());
    let bw = spec
        .and_then(|s| s.gb_per_s)
        .map(|g| g * 1e9)
        .unwrap_or(nominal.bandwidth());
    if !(lat >= 0.0 && lat.is_finite() && bw > 0.0 && bw.is_finite()) {
        return Err(format!(
            "{what}: latency_us must be >= 0 and gb_per_s > 0 (got {} µs, {} GB/s)",
            lat * 1e6,
            bw / 1e9
        ));
    }
    Ok((
        class,
        LinkCost {
            alpha: lat,
            beta: bw,
        },
    ))
}

impl ClusterSpec {
    /// Reads and parses a cluster file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading cluster file {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("cluster file {}: {e}", path.display()))
    }

    /// The cluster, its ranks' speeds from `flops_per_sample` where a node gives TFLOP/s.
    pub fn build(&self, flops_per_sample: Option<f64>) -> Result<Cluster, String> {
        if self.nodes.is_empty() {
            return Err("cluster file: \"nodes\" is empty; give at least one node".into());
        }
        let over = self.oversubscription.unwrap_or(1.0);
        if !(over >= 1.0 && over.is_finite()) {
            return Err(format!(
                "cluster file: oversubscription must be >= 1, got {over}"
            ));
        }
        let local = match self.local_gb_per_s {
            Some(g) if g > 0.0 && g.is_finite() => g * 1e9,
            Some(g) => return Err(format!("cluster file: local_gb_per_s must be > 0, got {g}")),
            None => f64::INFINITY,
        };
        let mut nodes = Vec::new();
        let mut speed = Vec::new();
        for n in &self.nodes {
            let at = format!("cluster file: node {:?}", n.node_id);
            if n.ranks == 0 {
                return Err(format!("{at}: ranks must be at least 1"));
            }
            let gpu = match n.device.as_deref() {
                None | Some("cpu") => false,
                Some("cuda") => true,
                Some(d) => {
                    return Err(format!("{at}: device {d:?}: accepted values are cpu, cuda"))
                }
            };
            let v = match (n.samples_per_s, n.tflops, flops_per_sample) {
                (Some(v), _, _) => v,
                (None, Some(t), Some(f)) => t * 1e12 / f,
                (None, Some(_), None) => {
                    return Err(format!(
                        "{at}: speed in tflops needs the job's FLOPs per sample (--model or --flops-per-sample)"
                    ))
                }
                (None, None, _) => return Err(format!("{at}: give samples_per_s or tflops")),
            };
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{at}: speed must be > 0 samples/s, got {v}"));
            }
            let (class, intra) = link(n.intra.as_ref(), LinkClass::Shm, &format!("{at}: intra"))?;
            if !class.is_intra_node() {
                return Err(format!(
                    "{at}: intra class {class} links hosts; accepted: shm, nvlink, pcie, same_process"
                ));
            }
            let (_, nic) = link(n.nic.as_ref(), LinkClass::Tcp, &format!("{at}: nic"))?;
            let count = n.count.unwrap_or(1);
            for i in 0..count {
                let name = if count == 1 {
                    n.node_id.clone()
                } else {
                    format!("{}-{i}", n.node_id)
                };
                nodes.push(NodeNet {
                    name,
                    ranks: n.ranks,
                    intra_class: class,
                    intra,
                    nic,
                    gpu,
                });
                speed.extend(std::iter::repeat_n(v, n.ranks));
            }
        }
        Ok(Cluster {
            net: Net {
                nodes,
                oversubscription: over,
                local_bytes_per_s: local,
            },
            speed,
        })
    }
}

impl Cluster {
    /// The first `k` nodes.
    pub fn first(&self, k: usize) -> Cluster {
        let nodes: Vec<NodeNet> = self.net.nodes[..k].to_vec();
        let ranks: usize = nodes.iter().map(|n| n.ranks).sum();
        Cluster {
            net: Net {
                nodes,
                ..self.net.clone()
            },
            speed: self.speed[..ranks].to_vec(),
        }
    }
}

/// A way to run the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strategy {
    /// Column name.
    pub name: &'static str,
    /// `HETCCL_ALGO`.
    pub algo: AlgoChoice,
    /// `HETCCL_COMPRESS`.
    pub compress: CompressMode,
    /// Batches in proportion to speed (else equal).
    pub balanced: bool,
}

/// The strategies compared, the flat ring with equal batches first.
pub const STRATEGIES: [Strategy; 5] = [
    Strategy {
        name: "ring+equal",
        algo: AlgoChoice::Ring,
        compress: CompressMode::Off,
        balanced: false,
    },
    Strategy {
        name: "hier",
        algo: AlgoChoice::Hier,
        compress: CompressMode::Off,
        balanced: false,
    },
    Strategy {
        name: "hier+fp16",
        algo: AlgoChoice::Hier,
        compress: CompressMode::Inter,
        balanced: false,
    },
    Strategy {
        name: "hier+balanced",
        algo: AlgoChoice::Hier,
        compress: CompressMode::Off,
        balanced: true,
    },
    Strategy {
        name: "all",
        algo: AlgoChoice::Hier,
        compress: CompressMode::Inter,
        balanced: true,
    },
];

/// The job as the step model uses it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepJob {
    /// Gradient bytes (f32).
    pub grad_bytes: usize,
    /// Samples per micro-batch over all ranks (`None`: `per_rank` each).
    pub global_batch: Option<usize>,
    /// Samples per rank per micro-batch when weak scaling.
    pub per_rank: usize,
    /// Micro-batches per step.
    pub update_freq: usize,
    /// Bucket bytes.
    pub bucket_bytes: usize,
}

/// One predicted step.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Samples per micro-batch of each rank.
    pub batch: Vec<usize>,
    /// Compute time of each rank (all micro-batches).
    pub compute: Vec<f64>,
    /// Each bucket's all-reduce alone (every rank starting together), seconds.
    pub bucket_comm: Vec<f64>,
    /// Step time.
    pub step: f64,
    /// Samples per step.
    pub samples: usize,
}

impl Step {
    /// The slowest rank's compute.
    pub fn compute_max(&self) -> f64 {
        self.compute.iter().copied().fold(0.0, f64::max)
    }
    /// Communication after the last rank's compute.
    pub fn exposed(&self) -> f64 {
        (self.step - self.compute_max()).max(0.0)
    }
    /// Communication time alone, all buckets.
    pub fn comm(&self) -> f64 {
        self.bucket_comm.iter().sum()
    }
    /// Share of the communication hidden under backward (0 when there is none).
    pub fn hidden(&self) -> f64 {
        let c = self.comm();
        if c > 0.0 {
            ((c - self.exposed()) / c).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
    /// Samples per second.
    pub fn throughput(&self) -> f64 {
        self.samples as f64 / self.step
    }
}

/// Splits `total` samples over ranks of `speed`: equal, or in proportion (largest
/// remainders; every rank at least one when there are enough).
pub fn batches(total: usize, speed: &[f64], balanced: bool) -> Vec<usize> {
    let n = speed.len();
    let sum: f64 = speed.iter().sum();
    let share: Vec<f64> = speed
        .iter()
        .map(|v| {
            if balanced {
                total as f64 * v / sum
            } else {
                total as f64 / n as f64
            }
        })
        .collect();
    let mut b: Vec<usize> = share.iter().map(|s| s.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| {
        (share[y] - share[y].floor())
            .total_cmp(&(share[x] - share[x].floor()))
            .then(x.cmp(&y))
    });
    let mut left = total - b.iter().sum::<usize>();
    for &i in order.iter().cycle().take(n * 2) {
        if left == 0 {
            break;
        }
        b[i] += 1;
        left -= 1;
    }
    b
}

/// Predicts one step of `job` on `cluster` under `s`.
pub fn step(cluster: &Cluster, job: &StepJob, s: Strategy) -> Result<Step, String> {
    let p = cluster.speed.len();
    let total = job.global_batch.unwrap_or(job.per_rank * p);
    if total < p {
        return Err(format!(
            "a micro-batch of {total} samples cannot feed {p} ranks"
        ));
    }
    let batch = batches(total, &cluster.speed, s.balanced);
    let micro: Vec<f64> = batch
        .iter()
        .zip(&cluster.speed)
        .map(|(&b, v)| b as f64 / v)
        .collect();
    let uf = job.update_freq.max(1) as f64;
    let compute: Vec<f64> = micro.iter().map(|t| uf * t).collect();
    let knobs = Knobs {
        algo: s.algo,
        compress: s.compress,
        ..Knobs::default()
    };
    let bucket = job.bucket_bytes.max(4) / 4 * 4;
    let mut sizes = vec![bucket; job.grad_bytes / bucket];
    if job.grad_bytes % bucket >= 4 {
        sizes.push(job.grad_bytes % bucket / 4 * 4);
    }
    let mut done: Vec<f64> = vec![0.0; p];
    let mut bucket_comm = Vec::with_capacity(sizes.len());
    let mut produced = 0usize;
    for &bytes in &sizes {
        produced += bytes;
        let frac = produced as f64 / job.grad_bytes as f64;
        let start: Vec<f64> = (0..p)
            .map(|r| {
                let ready = (uf - 1.0) * micro[r] + micro[r] / 3.0 + 2.0 * micro[r] / 3.0 * frac;
                ready.max(done[r])
            })
            .collect();
        done = timed::all_reduce(&cluster.net, bytes, knobs, &start)?.finish;
        bucket_comm.push(timed::all_reduce(&cluster.net, bytes, knobs, &vec![0.0; p])?.end());
    }
    let step = done
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(compute.iter().copied().fold(0.0, f64::max));
    Ok(Step {
        batch,
        compute,
        bucket_comm,
        step,
        samples: total * job.update_freq.max(1),
    })
}

/// Node counts shown: 1, 2, 4, ... and all of them.
pub fn node_counts(nodes: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |k| Some(k * 2))
        .take_while(|&k| k < nodes)
        .collect();
    v.push(nodes);
    v
}

/// Every strategy's step for the first `k` nodes, for each `k` of [`node_counts`].
pub fn sweep(cluster: &Cluster, job: &StepJob) -> Result<Vec<(usize, Vec<Step>)>, String> {
    node_counts(cluster.net.nodes.len())
        .into_iter()
        .map(|k| {
            let c = cluster.first(k);
            let steps = STRATEGIES
                .iter()
                .map(|&s| step(&c, job, s))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((k, steps))
        })
        .collect()
}

/// The table `hetccl simulate` prints.
pub fn table(cluster: &Cluster, rows: &[(usize, Vec<Step>)]) -> String {
    let mut out = String::new();
    let base = rows.first().map(|(_, s)| s[0].throughput()).unwrap_or(1.0);
    let speed1: f64 = cluster.first(1).speed.iter().sum();
    let _ = writeln!(
        out,
        "{:<6} {:>5} {:<14} {:>9} {:>9} {:>9} {:>7} {:>9} {:>10} {:>8} {:>6}",
        "nodes",
        "ranks",
        "strategy",
        "compute s",
        "comm s",
        "exposed s",
        "hidden",
        "step s",
        "samples/s",
        "speedup",
        "eff"
    );
    for (k, steps) in rows {
        let c = cluster.first(*k);
        let ideal: f64 = c.speed.iter().sum::<f64>() / speed1;
        for (s, st) in STRATEGIES.iter().zip(steps) {
            let speedup = st.throughput() / base;
            let _ = writeln!(
                out,
                "{:<6} {:>5} {:<14} {:>9.3} {:>9.3} {:>9.3} {:>6.0}% {:>9.3} {:>10.1} {:>8.2} {:>6.2}",
                k,
                c.speed.len(),
                s.name,
                st.compute_max(),
                st.comm(),
                st.exposed(),
                100.0 * st.hidden(),
                st.step,
                st.throughput(),
                speedup,
                speedup / ideal
            );
        }
    }
    if let Some((k, steps)) = rows.last() {
        let c = cluster.first(*k);
        let _ = writeln!(out, "\nper rank and bucket, {k} nodes:");
        for (s, st) in STRATEGIES.iter().zip(steps) {
            let mut per_node = Vec::new();
            let mut r = 0;
            for n in &c.net.nodes {
                let range = r..r + n.ranks;
                let b = &st.batch[range.clone()];
                let t = st.compute[range.clone()]
                    .iter()
                    .copied()
                    .fold(0.0, f64::max);
                per_node.push(format!("{} {:?} {:.3}s", n.name, b, t));
                r = range.end;
            }
            let buckets: Vec<String> = st.bucket_comm.iter().map(|t| format!("{t:.3}")).collect();
            let _ = writeln!(
                out,
                "  {:<14} batch and compute per node: {}",
                s.name,
                per_node.join(", ")
            );
            let _ = writeln!(
                out,
                "  {:<14} all-reduce per bucket, s: {}",
                "",
                buckets.join(" ")
            );
        }
    }
    out
}

/// Draws speedup (samples/s against the first node's flat ring) per strategy into `path`.
pub fn png(path: &Path, rows: &[(usize, Vec<Step>)]) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("writing {}: {e}", path.display());
    let base = rows.first().map(|(_, s)| s[0].throughput()).unwrap_or(1.0);
    let x_max = rows.iter().map(|r| r.0).max().unwrap_or(1) as f64;
    let y_max = rows
        .iter()
        .flat_map(|(_, s)| s.iter().map(|st| st.throughput() / base))
        .fold(x_max, f64::max);
    let fonts = have_font();
    let root = BitMapBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if fonts {
        b.caption("speedup against nodes", ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = b
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max * 1.1)
        .map_err(|e| err(&e))?;
    if fonts {
        chart
            .configure_mesh()
            .x_desc("nodes")
            .y_desc("speedup (samples/s / one node, flat ring)")
            .draw()
            .map_err(|e| err(&e))?;
    }
    let colors = [RED, BLUE, GREEN, MAGENTA, BLACK];
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (x_max, x_max)],
            BLACK.mix(0.2),
        ))
        .map_err(|e| err(&e))?;
    for (i, s) in STRATEGIES.iter().enumerate() {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .map(|(k, st)| (*k as f64, st[i].throughput() / base))
            .collect();
        let c = colors[i % colors.len()];
        let series = chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| err(&e))?;
        if fonts {
            series
                .label(s.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| err(&e))?;
    }
    if fonts {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Fonts tried for the PNG's text (plotters is built without font discovery): without
/// one the lines are drawn without labels.
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn have_font() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_FILES.iter().any(|f| {
            let small = std::fs::metadata(f).is_ok_and(|m| m.len() < 64 << 20);
            match std::fs::read(f) {
                Ok(bytes) if small => {
                    // plotters keeps fonts for the life of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    plotters::style::register_font(
                        "sans-serif",
                        plotters::style::FontStyle::Normal,
                        bytes,
                    )
                    .is_ok()
                }
                _ => false,
            }
        })
    })
}

struct Options {
    cluster: PathBuf,
    job: Job,
    png: Option<PathBuf>,
}

fn parse(args: &[std::ffi::OsString]) -> Result<Option<Options>, String> {
    let mut cluster = None;
    let mut job_file = None;
    let mut flags = Job::default();
    let mut png = None;
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse().map_err(|_| format!("{name} {v:?}: not a number"))
        }
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--job" => job_file = Some(PathBuf::from(value("--job")?)),
            "--model" => flags.model = Some(value("--model")?),
            "--params" => flags.params = Some(num("--params", value("--params")?)?),
            "--flops-per-sample" => {
                flags.flops_per_sample =
                    Some(num("--flops-per-sample", value("--flops-per-sample")?)?)
            }
            "--batch-per-rank" => {
                flags.batch_per_rank = Some(num("--batch-per-rank", value("--batch-per-rank")?)?)
            }
            "--global-batch" => {
                flags.global_batch = Some(num("--global-batch", value("--global-batch")?)?)
            }
            "--update-freq" => {
                flags.update_freq = Some(num("--update-freq", value("--update-freq")?)?)
            }
            "--bucket-mb" => flags.bucket_mb = Some(num("--bucket-mb", value("--bucket-mb")?)?),
            "--png" => png = Some(PathBuf::from(value("--png")?)),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ if cluster.is_none() => cluster = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument {a:?}: one cluster file only")),
        }
    }
    let cluster = cluster.ok_or("no cluster file given")?;
    let mut job: Job = match job_file {
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("reading job file {}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("job file {}: {e}", p.display()))?
        }
        None => Job::default(),
    };
    macro_rules! over {
        ($($f:ident),*) => { $( if flags.$f.is_some() { job.$f = flags.$f.clone(); } )* };
    }
    over!(
        model,
        params,
        flops_per_sample,
        batch_per_rank,
        global_batch,
        update_freq,
        bucket_mb
    );
    Ok(Some(Options { cluster, job, png }))
}

/// The job's step parameters and FLOPs per sample.
pub fn resolve(job: &Job) -> Result<(StepJob, Option<f64>), String> {
    let (params, flops) = match (&job.model, job.params) {
        (_, Some(p)) => (p, job.flops_per_sample),
        (Some(m), None) => {
            let (p, f) = preset(m).ok_or_else(|| {
                format!(
                    "model {m:?}: accepted values are bert-tiny, bert-mini, bert-small, bert-base"
                )
            })?;
            (p, job.flops_per_sample.or(Some(f)))
        }
        (None, None) => return Err("give the model: --model NAME or --params P".into()),
    };
    if !(params >= 1.0 && params.is_finite()) {
        return Err(format!("params must be at least 1, got {params}"));
    }
    let bucket_mb = job.bucket_mb.unwrap_or(25.0);
    if !(bucket_mb > 0.0 && bucket_mb.is_finite()) {
        return Err(format!("bucket size must be > 0 MiB, got {bucket_mb}"));
    }
    Ok((
        StepJob {
            grad_bytes: (params as usize) * 4,
            global_batch: job.global_batch,
            per_rank: job.batch_per_rank.unwrap_or(32).max(1),
            update_freq: job.update_freq.unwrap_or(1).max(1),
            bucket_bytes: ((bucket_mb * (1u64 << 20) as f64) as usize).max(4),
        },
        flops,
    ))
}

fn run(o: &Options) -> Result<String, String> {
    let (job, flops) = resolve(&o.job)?;
    let cluster = ClusterSpec::load(&o.cluster)?.build(flops)?;
    let rows = sweep(&cluster, &job)?;
    if let Some(p) = &o.png {
        png(p, &rows)?;
    }
    Ok(table(&cluster, &rows))
}

/// `hetccl simulate ARGS`: the exit code.
pub fn cli(args: &[std::ffi::OsString]) -> i32 {
    match parse(args) {
        Ok(None) => {
            let _ = writeln!(hetccl::log::stdout(), "{USAGE}");
            0
        }
        Err(e) => {
            let _ = writeln!(hetccl::log::stderr(), "hetccl simulate: {e}\n\n{USAGE}");
            2
        }
        Ok(Some(o)) => match run(&o) {
            Ok(t) => {
                let _ = write!(hetccl::log::stdout(), "{t}");
                0
            }
            Err(e) => {
                let _ = writeln!(hetccl::log::stderr(), "hetccl simulate: {e}");
                1
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIC: LinkCost = LinkCost {
        alpha: 50e-6,
        beta: 125e6,
    };

    fn two_nodes(speeds: [f64; 2]) -> Cluster {
        let node = |name: &str| NodeNet {
            name: name.into(),
            ranks: 1,
            intra_class: LinkClass::Shm,
            intra: LinkCost::SHM,
            nic: NIC,
            gpu: false,
        };
        Cluster {
            net: Net {
                nodes: vec![node("a"), node("b")],
                oversubscription: 1.0,
                local_bytes_per_s: f64::INFINITY,
            },
            speed: speeds.to_vec(),
        }
    }

    const RING: Strategy = STRATEGIES[0];

    /// One bucket, produced when backward ends: nothing hides; the step is the compute
    /// `b/v` plus the 2-rank ring `S/B + α`.
    #[test]
    fn one_bucket_after_backward_adds_the_whole_all_reduce() {
        let s = 8 << 20;
        let job = StepJob {
            grad_bytes: s,
            global_batch: None,
            per_rank: 10,
            update_freq: 1,
            bucket_bytes: s,
        };
        let st = step(&two_nodes([20.0, 20.0]), &job, RING).unwrap();
        let comm = s as f64 / NIC.beta + NIC.alpha;
        assert_eq!(st.batch, vec![10, 10]);
        assert!((st.compute_max() - 0.5).abs() < 1e-12);
        assert!((st.step - (0.5 + comm)).abs() < 1e-9, "{}", st.step);
        assert!(st.hidden() < 1e-9, "{}", st.hidden());
        assert!((st.throughput() - 20.0 / (0.5 + comm)).abs() < 1e-6);
    }

    /// Two buckets: the first is ready at 1/3 + 2/3·1/2 of the backward's micro-batch
    /// and its all-reduce (S/2B + α, 0.0336 s) ends long before the compute; only the
    /// second shows.
    #[test]
    fn an_early_bucket_hides_under_backward() {
        let s = 8 << 20;
        let job = StepJob {
            grad_bytes: s,
            global_batch: None,
            per_rank: 10,
            update_freq: 2,
            bucket_bytes: s / 2,
        };
        let st = step(&two_nodes([20.0, 20.0]), &job, RING).unwrap();
        let half = (s / 2) as f64 / NIC.beta + NIC.alpha;
        assert!((st.compute_max() - 1.0).abs() < 1e-12);
        assert!((st.step - (1.0 + half)).abs() < 1e-9, "{}", st.step);
        assert!((st.hidden() - 0.5).abs() < 1e-6, "{}", st.hidden());
        assert_eq!(st.samples, 40);
    }

    /// A rank at half speed: equal batches wait for it; batches in proportion (2:1) even
    /// the compute out.
    #[test]
    fn balanced_batches_follow_speed() {
        assert_eq!(batches(30, &[20.0, 10.0], true), vec![20, 10]);
        assert_eq!(batches(31, &[20.0, 10.0], true), vec![21, 10]);
        assert_eq!(batches(30, &[20.0, 10.0], false), vec![15, 15]);
        let job = StepJob {
            grad_bytes: 4096,
            global_batch: Some(30),
            per_rank: 0,
            update_freq: 1,
            bucket_bytes: 4096,
        };
        let c = two_nodes([20.0, 10.0]);
        let eq = step(&c, &job, STRATEGIES[1]).unwrap();
        let bal = step(&c, &job, STRATEGIES[3]).unwrap();
        assert!((eq.compute_max() - 1.5).abs() < 1e-12);
        assert!((bal.compute_max() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn presets_have_the_trainers_sizes() {
        let (tiny, _) = preset("bert-tiny").unwrap();
        let (base, flops) = preset("bert-base").unwrap();
        assert!((tiny / 1e6 - 4.4).abs() < 0.1, "{tiny}");
        assert!((base / 1e6 - 110.0).abs() < 2.0, "{base}");
        assert!(flops > 6.0 * base * 128.0);
        assert_eq!(preset("bert-huge"), None);
    }

    #[test]
    fn bad_cluster_files_name_the_node_and_what_is_accepted() {
        let spec: ClusterSpec = serde_json::from_str(
            r#"{"nodes": [{"node_id": "x", "ranks": 2, "device": "tpu", "samples_per_s": 1}]}"#,
        )
        .unwrap();
        assert_eq!(
            spec.build(None).unwrap_err(),
            "cluster file: node \"x\": device \"tpu\": accepted values are cpu, cuda"
        );
        let spec: ClusterSpec =
            serde_json::from_str(r#"{"nodes": [{"node_id": "y", "ranks": 1, "tflops": 10}]}"#)
                .unwrap();
        assert!(spec
            .build(None)
            .unwrap_err()
            .starts_with("cluster file: node \"y\": speed in tflops needs"));
        let e = serde_json::from_str::<ClusterSpec>(r#"{"nodes": [], "nic": 1}"#).unwrap_err();
        assert!(e.to_string().starts_with("unknown field `nic`"), "{e}");
    }
}
