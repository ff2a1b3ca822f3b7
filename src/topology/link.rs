//! Link classes between two ranks and their speed: nominal figures per class, replaced
//! by measured ones where the start-up probe (or a topology file) provides them.

/// How two ranks reach each other. The transports in this crate drive `Shm` and `Tcp`;
/// the others describe hardware that topology files (and later transports) know about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum LinkClass {
    /// Two ranks in one process (threads sharing an address space).
    #[serde(rename = "same_process")]
    SameProcess,
    /// Shared memory between processes on one host.
    #[serde(rename = "shm")]
    Shm,
    /// TCP sockets.
    #[serde(rename = "tcp")]
    Tcp,
    /// CUDA peer-to-peer over NVLink (one host).
    #[serde(rename = "nvlink")]
    NvLink,
    /// CUDA peer-to-peer over PCIe (one host).
    #[serde(rename = "pcie")]
    Pcie,
    /// RDMA between hosts (InfiniBand, RoCE).
    #[serde(rename = "rdma")]
    Rdma,
}

impl LinkClass {
    /// Every class, in table order.
    pub const ALL: [LinkClass; 6] = [
        LinkClass::SameProcess,
        LinkClass::Shm,
        LinkClass::Tcp,
        LinkClass::NvLink,
        LinkClass::Pcie,
        LinkClass::Rdma,
    ];

    /// Name in logs and topology files.
    pub fn name(self) -> &'static str {
        match self {
            LinkClass::SameProcess => "same_process",
            LinkClass::Shm => "shm",
            LinkClass::Tcp => "tcp",
            LinkClass::NvLink => "nvlink",
            LinkClass::Pcie => "pcie",
            LinkClass::Rdma => "rdma",
        }
    }

    /// True for classes that only exist between ranks of one node.
    pub fn is_intra_node(self) -> bool {
        matches!(
            self,
            LinkClass::SameProcess | LinkClass::Shm | LinkClass::NvLink | LinkClass::Pcie
        )
    }

    /// Typical figures, used where nothing was measured. Shm and TCP are what this
    /// crate's transports reach on a small server; NVLink is one A100 peer's share
    /// of NVLink 3, PCIe a Gen4 x16 peer copy, RDMA a 100 Gbit/s HCA.
    pub fn nominal(self) -> LinkPerf {
        let (latency_ns, bytes_per_s) = match self {
            LinkClass::SameProcess => (1_000, 10_000_000_000),
            LinkClass::Shm => (4_000, 5_000_000_000),
            LinkClass::Tcp => (25_000, 1_500_000_000),
            LinkClass::NvLink => (3_000, 150_000_000_000),
            LinkClass::Pcie => (5_000, 12_000_000_000),
            LinkClass::Rdma => (3_000, 12_000_000_000),
        };
        LinkPerf {
            latency_ns,
            bytes_per_s,
        }
    }
}

impl std::fmt::Display for LinkClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Latency and bandwidth of one link. Whole nanoseconds and bytes per second, so a
/// topology written to JSON reads back bit-for-bit equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkPerf {
    /// One-way time of a small message, including the software on both ends.
    pub latency_ns: u64,
    /// Bytes per second of a large message.
    pub bytes_per_s: u64,
}

impl LinkPerf {
    /// From seconds and bytes per second (rounded; bandwidth at least 1 B/s).
    pub fn from_secs(latency_s: f64, bytes_per_s: f64) -> Self {
        LinkPerf {
            latency_ns: (latency_s * 1e9).round().max(0.0) as u64,
            bytes_per_s: bytes_per_s.round().max(1.0) as u64,
        }
    }

    /// Latency in seconds.
    pub fn latency_s(&self) -> f64 {
        self.latency_ns as f64 / 1e9
    }

    /// Bandwidth in bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bytes_per_s.max(1) as f64
    }
}

/// One pair of ranks: the class of their link and, if known, its measured speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkInfo {
    /// How the two ranks are connected.
    pub class: LinkClass,
    /// What the start-up probe or a topology file says about it.
    pub measured: Option<LinkPerf>,
}

impl LinkInfo {
    /// A link of `class` with nothing measured.
    pub fn of(class: LinkClass) -> Self {
        LinkInfo {
            class,
            measured: None,
        }
    }

    /// Measured figures, else the class's nominal ones.
    pub fn perf(&self) -> LinkPerf {
        self.measured.unwrap_or_else(|| self.class.nominal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_rounds_to_whole_units_and_falls_back_to_nominal() {
        let p = LinkPerf::from_secs(12.3456e-6, 117.4e6);
        assert_eq!(
            p,
            LinkPerf {
                latency_ns: 12_346,
                bytes_per_s: 117_400_000
            }
        );
        assert_eq!(
            LinkInfo::of(LinkClass::Tcp).perf(),
            LinkClass::Tcp.nominal()
        );
        let m = LinkInfo {
            class: LinkClass::Tcp,
            measured: Some(p),
        };
        assert_eq!(m.perf().bandwidth(), 117.4e6);
        assert!(LinkClass::NvLink.is_intra_node());
        assert!(!LinkClass::Rdma.is_intra_node());
        assert_eq!(
            serde_json::to_string(&LinkClass::SameProcess).unwrap(),
            "\"same_process\""
        );
    }
}
