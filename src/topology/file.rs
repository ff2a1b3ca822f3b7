//! The JSON form of a [`Topology`]: the ranks, optional default link classes, and the
//! links that differ from the defaults or carry figures.
//!
//! ```json
//! {
//!   "ranks": [
//!     {"rank": 0, "node_id": "dgx-a", "hostname": "dgx-a",
//!      "device": {"cuda": {"ordinal": 0, "pci_bus_id": "0000:07:00.0",
//!                          "name": "NVIDIA A100-SXM4-80GB", "memory": 85899345920,
//!                          "sm_count": 108}}},
//!     ...
//!   ],
//!   "defaults": {"intra": "nvlink", "inter": "rdma"},
//!   "links": [
//!     {"ranks": [0, 4], "class": "rdma", "latency_us": 3.0, "gb_per_s": 12.0}
//!   ]
//! }
//! ```
//!
//! A rank may also give `pid` and `cpus` (CPUs online on its host; a node with more
//! ranks than that linked over TCP uses neither recursive halving nor whole pipeline
//! chunks). Without
//! `defaults`, ranks of one node are linked by shared memory (one process:
//! `same_process`) and nodes by TCP. A link entry may give the class, the figures, or
//! both; figures given alone keep the default class, one figure given alone takes the
//! other from the class's nominal figures. Nodes are the distinct `node_id`s, in order
//! of their lowest rank.
//!
//! Latency is written in microseconds and bandwidth in GB/s (10^9 bytes) for people;
//! in memory they are whole nanoseconds and bytes per second, so a dump reads back equal.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{default_class, LinkClass, LinkInfo, LinkPerf, RankInfo, Topology};
use crate::error::{Error, Result};

/// Largest topology file read (bytes). A hand-written file of a few hundred ranks is tens
/// of kB; a dump with measured figures for every pair of 1024 ranks is about 40 MB.
pub const TOPOLOGY_MAX_BYTES: u64 = 64 << 20;

/// Most ranks a topology file may describe: the topology holds a link for every pair
/// (24 bytes each, 400 MB at this count), built before the file is compared with the job.
pub const TOPOLOGY_MAX_RANKS: usize = 4096;

/// Reads the text of a topology file, refusing more than [`TOPOLOGY_MAX_BYTES`]: a
/// regular file by its size, anything else (`/dev/zero`, a FIFO) by reading one byte past
/// the limit at most.
pub(crate) fn read(path: &Path) -> Result<String> {
    let ctx = || format!("reading topology file {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| Error::io(ctx(), e))?;
    let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
    let too_large = |size: String| {
        Error::Topology(format!(
            "{}: {size} the {} MiB limit for a topology file",
            path.display(),
            TOPOLOGY_MAX_BYTES >> 20
        ))
    };
    if meta.is_file() && meta.len() > TOPOLOGY_MAX_BYTES {
        return Err(too_large(format!("{} bytes, more than", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(TOPOLOGY_MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(ctx(), e))?;
    if bytes.len() as u64 > TOPOLOGY_MAX_BYTES {
        return Err(too_large("larger than".into()));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::Topology(format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopologyFile {
    ranks: Vec<RankInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    defaults: Option<Defaults>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    links: Vec<PairEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    /// Class between ranks of one node.
    #[serde(default)]
    intra: Option<LinkClass>,
    /// Class between ranks of different nodes.
    #[serde(default)]
    inter: Option<LinkClass>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairEntry {
    ranks: [usize; 2],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    class: Option<LinkClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gb_per_s: Option<f64>,
}

impl From<Topology> for TopologyFile {
    fn from(t: Topology) -> Self {
        let n = t.ranks.len();
        let mut links = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let l = t.link(a, b);
                let default = default_class(&t.ranks[a], &t.ranks[b]);
                if l.class == default && l.measured.is_none() {
                    continue;
                }
                links.push(PairEntry {
                    ranks: [a, b],
                    class: Some(l.class),
                    latency_us: l.measured.map(|p| p.latency_ns as f64 / 1e3),
                    gb_per_s: l.measured.map(|p| p.bytes_per_s as f64 / 1e9),
                });
            }
        }
        TopologyFile {
            ranks: t.ranks,
            defaults: None,
            links,
        }
    }
}

fn finite_positive(what: &str, pair: [usize; 2], v: f64) -> std::result::Result<f64, String> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "link {pair:?}: {what} must be a finite non-negative number, not {v}"
        ))
    }
}

impl TryFrom<TopologyFile> for Topology {
    type Error = String;

    fn try_from(f: TopologyFile) -> std::result::Result<Self, String> {
        if f.ranks.is_empty() {
            return Err("no ranks".into());
        }
        if f.ranks.len() > TOPOLOGY_MAX_RANKS {
            return Err(format!(
                "{} ranks, more than the {TOPOLOGY_MAX_RANKS} a topology file may describe",
                f.ranks.len()
            ));
        }
        for (i, r) in f.ranks.iter().enumerate() {
            if r.rank != i {
                return Err(format!(
                    "ranks must be listed in order 0, 1, 2, ...: entry {i} says rank {}",
                    r.rank
                ));
            }
        }
        let mut t = Topology::from_ranks(f.ranks);
        let n = t.world_size();
        if let Some(d) = &f.defaults {
            if let Some(c) = d.inter.filter(|c| c.is_intra_node()) {
                return Err(format!(
                    "defaults.inter is {c}, which only links ranks of one node"
                ));
            }
            for a in 0..n {
                for b in a + 1..n {
                    let class = if t.node_of[a] == t.node_of[b] {
                        d.intra
                    } else {
                        d.inter
                    };
                    if let Some(c) = class {
                        t.set_link(a, b, LinkInfo::of(c));
                    }
                }
            }
        }
        for e in &f.links {
            let [a, b] = e.ranks;
            if a >= n || b >= n || a == b {
                return Err(format!(
                    "link {:?} must name two different ranks below {n}",
                    e.ranks
                ));
            }
            let mut l = t.link(a, b);
            if let Some(c) = e.class {
                l.class = c;
            }
            if l.class.is_intra_node() && t.node_of[a] != t.node_of[b] {
                return Err(format!(
                    "link {:?} is {}, but ranks {a} and {b} are on different nodes ({} and {})",
                    e.ranks, l.class, t.ranks[a].node_id, t.ranks[b].node_id
                ));
            }
            if e.latency_us.is_some() || e.gb_per_s.is_some() {
                let nominal = l.class.nominal();
                let lat = match e.latency_us {
                    Some(us) => finite_positive("latency_us", e.ranks, us)? * 1e-6,
                    None => nominal.latency_s(),
                };
                let bw = match e.gb_per_s {
                    Some(g) if g > 0.0 => finite_positive("gb_per_s", e.ranks, g)? * 1e9,
                    Some(g) => {
                        return Err(format!(
                            "link {:?}: gb_per_s must be above 0, not {g}",
                            e.ranks
                        ))
                    }
                    None => nominal.bandwidth(),
                };
                l.measured = Some(LinkPerf::from_secs(lat, bw));
            }
            t.set_link(a, b, l);
        }
        Ok(t)
    }
}
