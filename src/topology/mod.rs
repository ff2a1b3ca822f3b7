//! Who is where: which ranks share a host ("node"), local ranks, and link classes.
//!
//! Ranks are grouped into nodes by `HETCCL_NODE_ID` when set (tests use it to pretend
//! that one machine is several), else by hostname plus the kernel's boot id (two
//! containers with one hostname on different machines differ in boot id).

use crate::bootstrap::Bootstrap;
use crate::config::Config;
use crate::error::{Error, Result};

/// What one rank reports about itself at start.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankInfo {
    /// Global rank.
    pub rank: usize,
    /// Host name.
    pub hostname: String,
    /// Node key: ranks with equal keys share memory.
    pub node_id: String,
    /// Process id.
    pub pid: u32,
}

/// The job's layout: every rank's info and the nodes they form.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    /// Indexed by rank.
    pub ranks: Vec<RankInfo>,
    /// Node index of each rank.
    pub node_of: Vec<usize>,
    /// Ranks of each node, ascending; nodes ordered by their lowest rank.
    pub nodes: Vec<Vec<usize>>,
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
        }
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
        Topology {
            ranks: ranks.clone(),
            node_of,
            nodes,
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
}
