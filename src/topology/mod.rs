//! Who is where: which ranks share a host ("node"), each rank's device, how every
//! pair of ranks is linked and how fast those links are.
//!
//! Ranks are grouped into nodes by `HETCCL_NODE_ID` when set (tests use it to pretend
//! that one machine is several), else by hostname plus the kernel's boot id (two
//! containers with one hostname on different machines differ in boot id).
//!
//! The layout is pure data: [`Topology::gather`] discovers it at start, a short probe
//! ([`probe`]) adds measured latency and bandwidth per link, and [`Topology::load`]
//! reads a JSON description instead (to describe hardware this machine lacks, such as
//! 8-GPU NVLink nodes). [`Topology::dump`] writes the same format.

pub mod distance;
mod file;
pub mod link;
pub mod place;
pub mod probe;

pub use file::{TOPOLOGY_MAX_BYTES, TOPOLOGY_MAX_RANKS};
pub use link::{LinkClass, LinkInfo, LinkPerf};

use std::path::Path;

use crate::bootstrap::Bootstrap;
use crate::config::Config;
use crate::error::{Error, Result};

/// The device a rank computes on.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Host memory and CPU kernels.
    #[default]
    Cpu,
    /// One CUDA GPU.
    Cuda {
        /// CUDA device ordinal on its host.
        ordinal: usize,
        /// PCI bus id, e.g. `0000:07:00.0`: names the GPU across processes.
        pci_bus_id: String,
        /// Product name.
        name: String,
        /// Device memory in bytes.
        memory: u64,
        /// Streaming multiprocessors.
        sm_count: u32,
    },
}

impl Device {
    /// Short description for tables.
    pub fn label(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda {
                ordinal,
                name,
                memory,
                ..
            } => format!("cuda:{ordinal} {name} {} GiB", memory >> 30),
        }
    }
}

/// The device this process uses. Builds without CUDA support always compute on the
/// CPU; a CUDA build reports its selected GPU here.
pub fn local_device() -> Device {
    Device::Cpu
}

/// What one rank reports about itself at start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankInfo {
    /// Global rank.
    pub rank: usize,
    /// Host name.
    #[serde(default)]
    pub hostname: String,
    /// Node key: ranks with equal keys share memory.
    pub node_id: String,
    /// Process id (0: unknown, as in hand-written topology files).
    #[serde(default)]
    pub pid: u32,
    /// Where this rank computes.
    #[serde(default)]
    pub device: Device,
    /// CPUs online on the host (0: unknown, as in hand-written topology files).
    #[serde(default)]
    pub cpus: usize,
}

/// The job's layout: every rank's info, the nodes they form, and the link between
/// every pair of ranks.
///
/// Serialized (by [`Topology::dump`], read by [`Topology::load`]) as the ranks plus the
/// links that differ from what the node grouping implies, see the `file` module.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "file::TopologyFile", into = "file::TopologyFile")]
pub struct Topology {
    /// Indexed by rank.
    pub ranks: Vec<RankInfo>,
    /// Node index of each rank.
    pub node_of: Vec<usize>,
    /// Ranks of each node, ascending; nodes ordered by their lowest rank.
    pub nodes: Vec<Vec<usize>>,
    /// `links[a][b]`, symmetric; the diagonal is unused.
    links: Vec<Vec<LinkInfo>>,
}

/// This host's name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl RankInfo {
    /// Describes this process.
    pub fn local(rank: usize, cfg: &Config) -> Self {
        let hostname = hostname();
        let node_id = cfg
            .node_id
            .clone()
            .unwrap_or_else(|| format!("{hostname}/{}", boot_id()));
        RankInfo {
            rank,
            hostname,
            node_id,
            pid: std::process::id(),
            device: local_device(),
            cpus: host_cpus(),
        }
    }
}

/// CPUs online on this host: all of them, not the ones this process is pinned to (0
/// when the system will not say). What [`Topology::oversubscribed`] compares a node's
/// ranks with, as each rank reported it.
pub fn host_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(0)
}

/// The class two ranks' link has when nothing says otherwise: one process, one node
/// (shared memory) or the network.
fn default_class(a: &RankInfo, b: &RankInfo) -> LinkClass {
    if a.node_id != b.node_id {
        LinkClass::Tcp
    } else if a.pid != 0 && a.pid == b.pid && a.hostname == b.hostname {
        LinkClass::SameProcess
    } else {
        LinkClass::Shm
    }
}

impl Topology {
    /// Builds the layout from every rank's info (indexed by rank).
    pub fn from_ranks(ranks: Vec<RankInfo>) -> Self {
        let mut keys: Vec<&str> = Vec::new();
        let mut node_of = Vec::with_capacity(ranks.len());
        let mut nodes: Vec<Vec<usize>> = Vec::new();
        for r in &ranks {
            let idx = match keys.iter().position(|k| *k == r.node_id) {
                Some(i) => i,
                None => {
                    keys.push(&r.node_id);
                    nodes.push(Vec::new());
                    keys.len() - 1
                }
            };
            node_of.push(idx);
            nodes[idx].push(r.rank);
        }
        let links = ranks
            .iter()
            .map(|a| {
                ranks
                    .iter()
                    .map(|b| LinkInfo::of(default_class(a, b)))
                    .collect()
            })
            .collect();
        Topology {
            ranks,
            node_of,
            nodes,
            links,
        }
    }

    /// Exchanges [`RankInfo`] among all ranks.
    pub fn gather(cfg: &Config, boot: &mut dyn Bootstrap) -> Result<Self> {
        let me = RankInfo::local(boot.rank(), cfg);
        let blob = serde_json::to_vec(&me)
            .map_err(|e| Error::Bootstrap(format!("encoding rank info: {e}")))?;
        let all = boot.all_gather(&blob)?;
        let ranks = all
            .iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice::<RankInfo>(b).map_err(|e| {
                    Error::Bootstrap(format!("rank {r} sent unreadable rank info: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_ranks(ranks))
    }

    /// Whether node `k` runs more ranks than its host has CPUs, as its ranks reported
    /// them (false when none did).
    pub fn oversubscribed(&self, k: usize) -> bool {
        let ranks = &self.nodes[k];
        let cpus = ranks.iter().map(|&r| self.ranks[r].cpus).max().unwrap_or(0);
        cpus > 0 && ranks.len() > cpus
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Position of `rank` among the ranks of its node.
    pub fn local_rank(&self, rank: usize) -> usize {
        let node = &self.nodes[self.node_of[rank]];
        node.iter().position(|&r| r == rank).unwrap_or(0)
    }

    /// Number of ranks on `rank`'s node.
    pub fn local_size(&self, rank: usize) -> usize {
        self.nodes[self.node_of[rank]].len()
    }

    /// For each rank, whether it shares `rank`'s node.
    pub fn same_node(&self, rank: usize) -> Vec<bool> {
        let me = self.node_of[rank];
        self.node_of.iter().map(|&n| n == me).collect()
    }

    /// How ranks `a` and `b` are linked (`a == b` reads as one process).
    pub fn link(&self, a: usize, b: usize) -> LinkInfo {
        if a == b {
            return LinkInfo::of(LinkClass::SameProcess);
        }
        self.links[a][b]
    }

    /// Sets the link between `a` and `b` (both directions).
    pub fn set_link(&mut self, a: usize, b: usize, info: LinkInfo) {
        if a != b && a < self.ranks.len() && b < self.ranks.len() {
            self.links[a][b] = info;
            self.links[b][a] = info;
        }
    }

    /// Records measured figures for the link between `a` and `b`.
    pub fn set_measured(&mut self, a: usize, b: usize, perf: LinkPerf) {
        let mut l = self.link(a, b);
        l.measured = Some(perf);
        self.set_link(a, b, l);
    }

    /// True when some link carries measured figures.
    pub fn has_measurements(&self) -> bool {
        self.links.iter().flatten().any(|l| l.measured.is_some())
    }

    /// Ranks of one node talk TCP to each other (`HETCCL_SHM_DISABLE`).
    pub fn disable_shm(&mut self) {
        for row in &mut self.links {
            for l in row {
                if matches!(l.class, LinkClass::Shm | LinkClass::SameProcess) {
                    l.class = LinkClass::Tcp;
                }
            }
        }
    }

    /// Reads a topology from a JSON file (the format [`Topology::dump`] writes) of at most
    /// [`TOPOLOGY_MAX_BYTES`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = file::read(path)?;
        Self::from_json(&text).map_err(|e| Error::Topology(format!("{}: {e}", path.display())))
    }

    /// Parses the JSON form.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Topology(e.to_string()))
    }

    /// The JSON form, indented.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Topology(e.to_string()))
    }

    /// Writes the JSON form to `path` (through a temporary file, so a reader never
    /// sees half of it).
    pub fn dump(&self, path: &Path) -> Result<()> {
        let text = self.to_json()? + "\n";
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| Error::io(format!("writing topology file {}", path.display()), e))
    }

    /// Checks that a loaded topology can run on the discovered one: same number of
    /// ranks, and ranks it puts on one node really share a host (they will use shared
    /// memory). Ranks on one host may be described as separate nodes.
    pub fn check_placement(&self, discovered: &Topology) -> Result<()> {
        if self.world_size() != discovered.world_size() {
            return Err(Error::Topology(format!(
                "the topology file describes {} ranks but {} are running",
                self.world_size(),
                discovered.world_size()
            )));
        }
        for node in &self.nodes {
            for &r in node {
                if discovered.node_of[r] != discovered.node_of[node[0]] {
                    return Err(Error::Topology(format!(
                        "the topology file puts ranks {} and {r} on one node, but they run on \
                         {} and {}",
                        node[0], discovered.ranks[node[0]].node_id, discovered.ranks[r].node_id
                    )));
                }
            }
        }
        Ok(())
    }

    /// The layout as a text table: one line per rank, then one line per pair in
    /// `pairs` (class, latency, bandwidth, and whether measured).
    pub fn table(&self, pairs: &[(usize, usize)]) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "{} ranks on {} nodes\n{:>5} {:>5} {:<24} {}\n",
            self.world_size(),
            self.nodes.len(),
            "rank",
            "node",
            "host",
            "device"
        );
        for r in &self.ranks {
            let _ = writeln!(
                s,
                "{:>5} {:>5} {:<24} {}",
                r.rank,
                self.node_of[r.rank],
                r.hostname,
                r.device.label()
            );
        }
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:<13} {:>12} {:>10}  source",
            "a", "b", "link", "latency_us", "GB/s"
        );
        for &(a, b) in pairs {
            let l = self.link(a, b);
            let p = l.perf();
            let _ = writeln!(
                s,
                "{a:>5} {b:>5} {:<13} {:>12.1} {:>10.3}  {}",
                l.class.name(),
                p.latency_ns as f64 / 1e3,
                p.bandwidth() / 1e9,
                if l.measured.is_some() {
                    "measured"
                } else {
                    "nominal"
                }
            );
        }
        s
    }
}

/// CPU ranks on hosts `h0, h1, …` holding `sizes[k]` ranks each, numbered node by node.
#[cfg(test)]
pub(crate) fn cpu_nodes(sizes: &[usize]) -> Topology {
    let mut ranks = Vec::new();
    for (k, &g) in sizes.iter().enumerate() {
        for _ in 0..g {
            ranks.push(RankInfo {
                rank: ranks.len(),
                hostname: format!("h{k}"),
                node_id: format!("n{k}"),
                pid: 100 + ranks.len() as u32,
                device: Device::Cpu,
                cpus: 0,
            });
        }
    }
    Topology::from_ranks(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: usize, node: &str) -> RankInfo {
        RankInfo {
            rank,
            hostname: "h".into(),
            node_id: node.into(),
            pid: 1,
            device: Device::Cpu,
            cpus: 0,
        }
    }

    #[test]
    fn groups_ranks_into_nodes() {
        let t = Topology::from_ranks(vec![
            info(0, "a"),
            info(1, "b"),
            info(2, "a"),
            info(3, "c"),
            info(4, "b"),
        ]);
        assert_eq!(t.nodes, vec![vec![0, 2], vec![1, 4], vec![3]]);
        assert_eq!(t.node_of, vec![0, 1, 0, 2, 1]);
        assert_eq!(t.local_rank(4), 1);
        assert_eq!(t.local_size(3), 1);
        assert_eq!(t.same_node(2), vec![true, false, true, false, false]);
    }

    #[test]
    fn default_link_classes_follow_process_and_node() {
        let mut ranks = vec![info(0, "a"), info(1, "a"), info(2, "a"), info(3, "b")];
        ranks[2].pid = 2;
        let mut t = Topology::from_ranks(ranks);
        assert_eq!(t.link(0, 1).class, LinkClass::SameProcess);
        assert_eq!(t.link(0, 2).class, LinkClass::Shm);
        assert_eq!(t.link(2, 3).class, LinkClass::Tcp);
        assert_eq!(t.link(3, 3).class, LinkClass::SameProcess);
        t.disable_shm();
        assert_eq!(t.link(0, 2).class, LinkClass::Tcp);
        assert_eq!(t.link(1, 0).class, LinkClass::Tcp);
    }

    #[test]
    fn dump_reads_back_equal_with_measurements_and_devices() {
        let mut ranks = vec![info(0, "a"), info(1, "a"), info(2, "b")];
        ranks[1].pid = 7;
        ranks[2].device = Device::Cuda {
            ordinal: 3,
            pci_bus_id: "0000:41:00.0".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory: 85_520_809_984,
            sm_count: 132,
        };
        let mut t = Topology::from_ranks(ranks);
        t.set_measured(0, 1, LinkPerf::from_secs(3.217e-6, 6.123456789e9));
        t.set_measured(1, 2, LinkPerf::from_secs(61.3e-6, 117_187_500.0));
        t.set_link(0, 2, LinkInfo::of(LinkClass::Rdma));
        let json = t.to_json().unwrap();
        assert_eq!(Topology::from_json(&json).unwrap(), t);
        let dir = std::env::temp_dir().join(format!("hetccl-topo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        t.dump(&path).unwrap();
        assert_eq!(Topology::load(&path).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
        // Only what differs from the defaults is written: three links.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["links"].as_array().unwrap().len(), 3);
        assert_eq!(v["links"][0]["latency_us"], 3.217);
    }

    #[test]
    fn hand_written_files_use_defaults_and_are_checked() {
        let t = Topology::from_json(
            r#"{"ranks": [{"rank": 0, "node_id": "x"}, {"rank": 1, "node_id": "x"},
                          {"rank": 2, "node_id": "y"}],
                "defaults": {"intra": "nvlink", "inter": "rdma"},
                "links": [{"ranks": [1, 2], "gb_per_s": 3.5}]}"#,
        )
        .unwrap();
        assert_eq!(t.nodes, vec![vec![0, 1], vec![2]]);
        assert_eq!(t.link(0, 1), LinkInfo::of(LinkClass::NvLink));
        assert_eq!(t.link(0, 2), LinkInfo::of(LinkClass::Rdma));
        assert_eq!(
            t.link(2, 1).measured,
            Some(LinkPerf {
                latency_ns: 3_000,
                bytes_per_s: 3_500_000_000
            })
        );
        let bad = |json: &str| Topology::from_json(json).unwrap_err().to_string();
        assert!(bad(
            r#"{"ranks": [{"rank": 0, "node_id": "x"}, {"rank": 1, "node_id": "y"}],
                    "links": [{"ranks": [0, 1], "class": "nvlink"}]}"#
        )
        .contains("link [0, 1] is nvlink, but ranks 0 and 1 are on different nodes (x and y)"),);
        assert!(bad(r#"{"ranks": [{"rank": 1, "node_id": "x"}]}"#).contains("entry 0 says rank 1"));
        assert!(
            bad(r#"{"ranks": [{"rank": 0, "node_id": "x"}], "links": [{"ranks": [0, 0]}]}"#)
                .contains("two different ranks below 1")
        );
        assert!(
            bad(r#"{"ranks": [{"rank": 0, "node_id": "x", "gpus": 8}]}"#)
                .contains("unknown field `gpus`")
        );
    }

    #[test]
    fn a_file_must_fit_the_running_job() {
        let file = Topology::from_ranks(vec![info(0, "a"), info(1, "a"), info(2, "b")]);
        let ok = Topology::from_ranks(vec![info(0, "h"), info(1, "h"), info(2, "h")]);
        file.check_placement(&ok).unwrap();
        let split = Topology::from_ranks(vec![info(0, "h"), info(1, "g"), info(2, "h")]);
        assert_eq!(
            file.check_placement(&split).unwrap_err().to_string(),
            "topology: the topology file puts ranks 0 and 1 on one node, but they run on h and g"
        );
        let small = Topology::from_ranks(vec![info(0, "h")]);
        assert_eq!(
            file.check_placement(&small).unwrap_err().to_string(),
            "topology: the topology file describes 3 ranks but 1 are running"
        );
    }
}
