//! `hetccl doctor`: a preflight that runs as a job (`hetccl run -n N -- hetccl doctor`,
//! or one process per rank under mpirun, srun or torchrun) and checks what breaks jobs
//! before a real one finds out.
//!
//! ```text
//! every rank, alone       /dev/shm against the segments this job's shm links would make,
//!                         locked-memory (pinned) and open-file limits, the interface and
//!                         its route to MASTER_ADDR, the job key; GPUs, IPC between this
//!                         host's ranks' GPUs and pinned memory (feature cuda; skipped,
//!                         with the reason, without it or without a CUDA driver)
//!                         a failed /dev/shm or interface check is left out of what
//!                         follows (TCP instead; the default route), so the rest runs
//! every rank, together    a communicator: every rank joins, every connection authenticated
//!                         all pairs in one global order (no cycle of waits): 20 ping-pongs
//!                         (latency; the peer's clock, for the skew to rank 0), then 3
//!                         messages of 4 MiB (bandwidth); MTU of each rank's interface
//!                         everything all-gathered, so every rank decides the same exit
//! rank 0                  one table: check, ok / warn / FAIL, what was found, the fix
//! ```
//!
//! The exit status is 1 when a check failed on any rank, else 0. A rank that cannot join
//! the others prints its own table, with what stopped it, and exits 1; so does a rank
//! whose job key check failed (no `HETCCL_JOB_KEY` where the ranks may span hosts: the
//! bootstrap would refuse), without trying to join. Interfaces of different MTUs fail;
//! so does a clock more than 1 s off rank 0's (`HETCCL_DOCTOR_CLOCK_OFFSET_MS` skews a
//! rank's replies, to see that check fail).

use std::fmt::Write as _;
use std::time::Instant;

use hetccl::config::Config;
use hetccl::transport::shm::ShmGeometry;
use hetccl::transport::LinkKind;
use hetccl::Communicator;

/// Help text.
pub const USAGE: &str = "\
usage: hetccl doctor

Run it as a job, as the real job would run: hetccl run -n N -- hetccl doctor (or under
mpirun, srun, torchrun), with the same HETCCL_* settings. Rank 0 prints one line per
check (ok, warn or FAIL, and the fix) and every rank exits 1 when a check failed.";

/// How a check came out.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Status {
    /// Fine.
    Ok,
    /// Not checked here, for the reason given (no CUDA driver, a build without GPUs):
    /// neither passed nor failed.
    Skip,
    /// Works, but slower or weaker than it could.
    Warn,
    /// A job would fail.
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Skip => "skipped",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    /// Which check.
    pub check: String,
    /// Its outcome.
    pub status: Status,
    /// What was found.
    pub found: String,
    /// What to do, when not ok.
    pub fix: String,
}

fn row(check: &str, status: Status, found: impl Into<String>, fix: impl Into<String>) -> Row {
    Row {
        check: check.into(),
        status,
        found: found.into(),
        fix: fix.into(),
    }
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", b >> 10)
    }
}

/// `/dev/shm` free space against what this host's ranks' shm links create: one segment
/// per pair of ranks on the host (`ShmGeometry`).
pub fn check_shm(cfg: &Config, dir: &str, local_ranks: usize) -> Row {
    if cfg.shm_disable {
        return row(
            "/dev/shm",
            Status::Ok,
            "not used (HETCCL_SHM_DISABLE=1: TCP between ranks of one host)",
            "",
        );
    }
    let pairs = (local_ranks * local_ranks.saturating_sub(1) / 2) as u64;
    let cpus = hetccl::topology::host_cpus();
    let oversubscribed = cpus > 0 && local_ranks > cpus;
    let seg = ShmGeometry::from_config(cfg, oversubscribed).segment_bytes() as u64;
    let planned = pairs * seg;
    let Some(free) = fs_free(dir) else {
        return row(
            "/dev/shm",
            Status::Fail,
            format!(
                "{dir} cannot be read; {pairs} segment(s) of {} planned",
                mib(seg)
            ),
            "mount a tmpfs there (docker: --shm-size=1g) or set HETCCL_SHM_DISABLE=1",
        );
    };
    let found = format!(
        "{} free in {dir}, {} planned ({pairs} segment(s) of {} for {local_ranks} rank(s) on this host)",
        mib(free),
        mib(planned),
        mib(seg)
    );
    if free < planned {
        row(
            "/dev/shm",
            Status::Fail,
            found,
            format!(
                "enlarge {dir} to at least {} (docker run --shm-size={}m; mount -o remount,size=... {dir}), \
                 lower HETCCL_CHUNK_BYTES, or set HETCCL_SHM_DISABLE=1 to use TCP",
                mib(planned),
                planned.div_ceil(1 << 20) * 2
            ),
        )
    } else if free < planned * 2 {
        row(
            "/dev/shm",
            Status::Warn,
            found,
            "shared buffers (alloc_shared) and other jobs need room too: enlarge it",
        )
    } else {
        row("/dev/shm", Status::Ok, found, "")
    }
}

fn fs_free(dir: &str) -> Option<u64> {
    let path = std::ffi::CString::new(dir).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out pointer for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn soft_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return None;
    }
    Some(r.rlim_cur)
}

/// Pinned host memory the staged device path locks: two staging buffers.
fn pinned_bytes(cfg: &Config) -> u64 {
    #[cfg(feature = "cuda")]
    {
        2 * cfg.device_stage_bytes as u64
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cfg;
        2 * (2 << 20)
    }
}

/// `ulimit -l` against the pinned staging buffers.
pub fn check_memlock(cfg: &Config, limit: Option<u64>) -> Row {
    let need = pinned_bytes(cfg);
    let fix = format!(
        "raise the locked-memory limit to at least {} (ulimit -l unlimited; memlock in \
         /etc/security/limits.conf; docker run --ulimit memlock=-1)",
        mib(need)
    );
    match limit {
        None => row(
            "locked memory",
            Status::Warn,
            "the limit cannot be read",
            fix,
        ),
        Some(l) if l == libc::RLIM_INFINITY => {
            row("locked memory", Status::Ok, "unlimited (ulimit -l)", "")
        }
        Some(l) if l < need => row(
            "locked memory",
            Status::Fail,
            format!(
                "ulimit -l is {}, below the {} of pinned staging buffers a device collective locks",
                mib(l),
                mib(need)
            ),
            fix,
        ),
        Some(l) => row(
            "locked memory",
            Status::Ok,
            format!(
                "ulimit -l is {} (pinned staging needs {})",
                mib(l),
                mib(need)
            ),
            "",
        ),
    }
}

/// `ulimit -n` against the descriptors a rank holds: sockets per peer, shm segments, the
/// store, plus room for the program.
pub fn check_nofile(cfg: &Config, world: usize, limit: Option<u64>) -> Row {
    let need = (world * (cfg.nsocks_per_peer + 2) + 64) as u64;
    let fix = format!("raise the open-file limit to at least {} (ulimit -n 65536; nofile in /etc/security/limits.conf)", need * 4);
    match limit {
        None => row("open files", Status::Warn, "the limit cannot be read", fix),
        Some(l) if l < need => row(
            "open files",
            Status::Fail,
            format!("ulimit -n is {l}, below the {need} descriptors {world} ranks need"),
            fix,
        ),
        Some(l) if l < need * 4 => row(
            "open files",
            Status::Warn,
            format!(
                "ulimit -n is {l}: little room above the {need} descriptors {world} ranks need"
            ),
            fix,
        ),
        Some(l) => row(
            "open files",
            Status::Ok,
            format!("ulimit -n is {l} ({need} needed)"),
            "",
        ),
    }
}

/// The interface hetccl listens and connects on, and its MTU. `None` as the second value
/// when it was not found.
pub fn check_interface(cfg: &Config) -> (Row, Option<(String, u32)>) {
    let ifs = match hetccl::bootstrap::netif::ipv4_interfaces() {
        Ok(i) => i,
        Err(e) => {
            return (
                row(
                    "interface",
                    Status::Fail,
                    e.to_string(),
                    "check the network setup",
                ),
                None,
            )
        }
    };
    let names: Vec<&str> = ifs.iter().map(|(n, ..)| n.as_str()).collect();
    let chosen = match &cfg.socket_ifname {
        Some(want) => {
            let hit = ifs.iter().find(|(n, ..)| n == want).or_else(|| {
                ifs.iter()
                    .find(|(n, _, up, _)| *up && n.starts_with(want.as_str()))
            });
            match hit {
                Some(i) => (i.clone(), format!("HETCCL_SOCKET_IFNAME={want}")),
                None => {
                    return (
                        row(
                            "interface",
                            Status::Fail,
                            format!(
                            "HETCCL_SOCKET_IFNAME={want}: no interface of that name (or prefix) \
                                 with an IPv4 address on this host"
                        ),
                            format!(
                                "set HETCCL_SOCKET_IFNAME to one of: {}, or unset it",
                                names.join(", ")
                            ),
                        ),
                        None,
                    )
                }
            }
        }
        None => {
            // The interface of the route to MASTER_ADDR: the kernel's choice of source
            // address for a datagram socket connected there (nothing is sent).
            // No MASTER_ADDR (mpirun on one host: the store is found through a key
            // file): the ranks meet on loopback.
            let master = cfg
                .launch
                .master_addr
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into());
            let port = cfg.launch.master_port.unwrap_or(9);
            let local = std::net::UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.connect((master.as_str(), port)).map(|()| s))
                .and_then(|s| s.local_addr());
            let ip =
                match local {
                    Ok(a) => a.ip(),
                    Err(e) => return (
                        row(
                            "interface",
                            Status::Fail,
                            format!("no route to MASTER_ADDR {master}: {e}"),
                            "check MASTER_ADDR, or name the interface with HETCCL_SOCKET_IFNAME",
                        ),
                        None,
                    ),
                };
            match ifs.iter().find(|(_, a, ..)| std::net::IpAddr::V4(*a) == ip) {
                Some(i) => (i.clone(), format!("the route to MASTER_ADDR {master}")),
                None => {
                    return (
                        row(
                            "interface",
                            Status::Warn,
                            format!(
                                "the route to {master} leaves from {ip}, on no interface listed"
                            ),
                            "name the interface with HETCCL_SOCKET_IFNAME",
                        ),
                        None,
                    )
                }
            }
        }
    };
    let ((name, ip, up, _), why) = chosen;
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let found = format!("{name} ({ip}, MTU {mtu}), {why}");
    if !up {
        return (
            row(
                "interface",
                Status::Fail,
                format!("{found}: the interface is down"),
                format!("bring it up (ip link set {name} up) or choose another"),
            ),
            Some((name, mtu)),
        );
    }
    (row("interface", Status::Ok, found, ""), Some((name, mtu)))
}

/// The job key every connection is authenticated with.
pub fn check_job_key(cfg: &Config, world: usize) -> Row {
    if let Some(why) = hetccl::bootstrap::missing_cross_host_key(cfg) {
        return row(
            "job key",
            Status::Fail,
            format!("HETCCL_JOB_KEY unset, and {why}: the bootstrap refuses to start"),
            hetccl::bootstrap::cross_host_key_fix(),
        );
    }
    match cfg.job_key.as_deref() {
        Some(k) if k.len() < 16 => row(
            "job key",
            Status::Warn,
            format!("HETCCL_JOB_KEY has {} characters: easy to guess", k.len()),
            "use a random secret of 32 hex digits or more (openssl rand -hex 32)",
        ),
        Some(k) => row(
            "job key",
            Status::Ok,
            format!("HETCCL_JOB_KEY set ({} characters)", k.len()),
            "",
        ),
        None if world <= 1 => row("job key", Status::Ok, "one rank: no connections", ""),
        None => row(
            "job key",
            Status::Ok,
            "HETCCL_JOB_KEY unset: one host's ranks share a private key file (across hosts \
             the bootstrap refuses to start without a key)",
            "",
        ),
    }
}

/// Why the GPU checks cannot run here, if they cannot: a build without the `cuda`
/// feature, or no CUDA driver library (cudarc would panic on the first driver call, so
/// the library is looked for first).
fn gpu_checks_skipped() -> Option<&'static str> {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen the driver library; no CUDA function is called.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Some("no CUDA driver library (libcuda.so) on this host");
        }
        None
    }
    #[cfg(not(feature = "cuda"))]
    Some("built without the cuda feature (host collectives only)")
}

/// GPUs this rank can use (feature `cuda`; the driver is asked only when its library
/// loads).
pub fn check_gpus() -> Row {
    if let Some(why) = gpu_checks_skipped() {
        return row("GPUs", Status::Skip, format!("not checked: {why}"), "");
    }
    #[cfg(feature = "cuda")]
    {
        let probe = std::panic::catch_unwind(|| {
            cudarc::driver::result::init()?;
            cudarc::driver::result::device::get_count()
        });
        match probe {
            Ok(Ok(n)) if n > 0 => row("GPUs", Status::Ok, format!("{n} CUDA device(s)"), ""),
            Ok(Ok(_)) => row(
                "GPUs",
                Status::Warn,
                "the CUDA driver sees no device",
                "check CUDA_VISIBLE_DEVICES and nvidia-smi",
            ),
            Ok(Err(e)) => row(
                "GPUs",
                Status::Fail,
                format!("the CUDA driver failed to initialise: {e}"),
                "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
            ),
            Err(_) => row(
                "GPUs",
                Status::Fail,
                "the CUDA driver lacks an entry point this build needs (older than CUDA 13.0?)",
                "update the NVIDIA driver",
            ),
        }
    }
    #[cfg(not(feature = "cuda"))]
    skipped_without_cuda("GPUs")
}

#[cfg(not(feature = "cuda"))]
fn skipped_without_cuda(check: &str) -> Row {
    // What `gpu_checks_skipped` says for every build without the feature.
    row(
        check,
        Status::Skip,
        "not checked: built without the cuda feature",
        "",
    )
}

/// The device a local rank uses, as the device collectives pick it: local rank modulo
/// the devices visible.
#[cfg(feature = "cuda")]
fn device_of(local_rank: usize, devices: usize) -> usize {
    local_rank % devices.max(1)
}

/// CUDA IPC between the GPUs of this host's ranks: this rank's device can map every
/// other local rank's device memory (`cuDeviceCanAccessPeer`); ranks on one device need
/// no peer access. Opening a peer's IPC handle needs the peer's process and is left to
/// the job's first device collective, which fails with the driver's words.
pub fn check_gpu_ipc(local_rank: usize, local_ranks: usize) -> Row {
    if let Some(why) = gpu_checks_skipped() {
        return row("GPU IPC", Status::Skip, format!("not checked: {why}"), "");
    }
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::result;
        let probe = std::panic::catch_unwind(|| -> Result<Row, result::DriverError> {
            result::init()?;
            let n = result::device::get_count()?.max(0) as usize;
            if n == 0 {
                return Ok(row(
                    "GPU IPC",
                    Status::Skip,
                    "not checked: the CUDA driver sees no device",
                    "",
                ));
            }
            let mine = device_of(local_rank, n);
            let me = result::device::get(mine as i32)?;
            let mut blocked = Vec::new();
            let mut others: Vec<usize> = (0..local_ranks)
                .map(|l| device_of(l, n))
                .filter(|&d| d != mine)
                .collect();
            others.sort_unstable();
            others.dedup();
            for &d in &others {
                let peer = result::device::get(d as i32)?;
                let mut can = 0i32;
                // SAFETY: both handles came from the driver just now; `can` is written.
                let rc = unsafe { cudarc::driver::sys::cuDeviceCanAccessPeer(&mut can, me, peer) };
                rc.result()?;
                if can == 0 {
                    blocked.push(d.to_string());
                }
            }
            Ok(if blocked.is_empty() {
                row(
                    "GPU IPC",
                    Status::Ok,
                    format!(
                        "device {mine} maps the memory of {} other local device(s)",
                        others.len()
                    ),
                    "",
                )
            } else {
                row(
                    "GPU IPC",
                    Status::Warn,
                    format!(
                        "device {mine} cannot access device(s) {} directly",
                        blocked.join(", ")
                    ),
                    "enable peer access between the GPUs (IOMMU/ACS settings, one PCIe \
                     root), or run the device collectives on the staged path \
                     (DevicePath::Staged), through host memory",
                )
            })
        });
        match probe {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => row(
                "GPU IPC",
                Status::Fail,
                format!("the CUDA driver failed: {e}"),
                "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
            ),
            Err(_) => row(
                "GPU IPC",
                Status::Fail,
                "the CUDA driver lacks an entry point this build needs",
                "update the NVIDIA driver",
            ),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (local_rank, local_ranks);
        skipped_without_cuda("GPU IPC")
    }
}

/// Pinned host memory: the staged device path's two staging buffers, allocated once
/// and freed (`cuMemHostAlloc`), which is where a low `ulimit -l` or a container's
/// limit shows.
pub fn check_pinned(cfg: &Config) -> Row {
    if let Some(why) = gpu_checks_skipped() {
        return row(
            "pinned memory",
            Status::Skip,
            format!("not checked: {why}"),
            "",
        );
    }
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::result;
        let need = pinned_bytes(cfg) as usize;
        let probe = std::panic::catch_unwind(|| -> Result<(), result::DriverError> {
            result::init()?;
            let dev = result::device::get(0)?;
            // SAFETY: the primary context is retained, made current, used for one
            // allocation freed at once, and released.
            unsafe {
                let ctx = result::primary_ctx::retain(dev)?;
                result::ctx::set_current(ctx)?;
                let r = result::malloc_host(need, 0).and_then(|p| result::free_host(p));
                result::primary_ctx::release(dev)?;
                r
            }
        });
        match probe {
            Ok(Ok(())) => row(
                "pinned memory",
                Status::Ok,
                format!("{} of pinned staging buffers allocated", mib(need as u64)),
                "",
            ),
            Ok(Err(e)) => row(
                "pinned memory",
                Status::Fail,
                format!(
                    "{} of pinned memory could not be allocated: {e}",
                    mib(need as u64)
                ),
                "raise the locked-memory limit (ulimit -l, the container's memlock) or lower \
                 HETCCL_DEVICE_STAGE_BYTES",
            ),
            Err(_) => row(
                "pinned memory",
                Status::Fail,
                "the CUDA driver lacks an entry point this build needs",
                "update the NVIDIA driver",
            ),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = cfg;
        skipped_without_cuda("pinned memory")
    }
}

/// One pair as its lower rank measured it: (peer, link, one-way latency us, bandwidth
/// GB/s, peer clock minus ours in ms).
type Pair = (usize, String, f64, f64, f64);

/// What one rank found, all-gathered.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Findings {
    rank: usize,
    host: String,
    rows: Vec<Row>,
    /// Interface and MTU.
    iface: Option<(String, u32)>,
    /// The pairs this rank is the lower rank of.
    pairs: Vec<Pair>,
}

/// Bytes per bandwidth message, and how many.
const BW_BYTES: usize = 4 << 20;
const BW_ROUNDS: usize = 3;
const PINGS: usize = 20;

fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Every pair of ranks in one global order: the lower rank measures.
/// `offset_ms` is added to this rank's clock in its replies (`HETCCL_DOCTOR_CLOCK_OFFSET_MS`).
fn exchange(comm: &Communicator, offset_ms: f64) -> hetccl::Result<Vec<Pair>> {
    let (me, n) = (comm.rank(), comm.world_size());
    let mut out = Vec::new();
    let mut big = vec![0u8; BW_BYTES];
    let mut clock = [0f64; 1];
    for a in 0..n {
        for b in a + 1..n {
            if me == a {
                let mut rtts = Vec::with_capacity(PINGS);
                let mut offset = 0.0;
                let mut best = f64::MAX;
                for _ in 0..PINGS {
                    let t0 = wall_ms();
                    let s = Instant::now();
                    comm.send(&[t0], b)?;
                    comm.recv(&mut clock, b)?;
                    let rtt = s.elapsed().as_secs_f64() * 1e3;
                    let t1 = wall_ms();
                    rtts.push(rtt);
                    // The peer's clock against the middle of the round trip, from the
                    // shortest one (least disturbed by scheduling).
                    if rtt < best {
                        best = rtt;
                        offset = clock[0] - (t0 + t1) / 2.0;
                    }
                }
                rtts.sort_by(f64::total_cmp);
                let lat_us = rtts[rtts.len() / 2] / 2.0 * 1e3;
                let s = Instant::now();
                for _ in 0..BW_ROUNDS {
                    comm.send(&big, b)?;
                }
                comm.recv(&mut clock, b)?;
                let gbs = (BW_BYTES * BW_ROUNDS) as f64 / s.elapsed().as_secs_f64() / 1e9;
                let link = match comm.link_kind(b) {
                    Some(LinkKind::Shm) => "shm",
                    Some(LinkKind::Tcp) => "tcp",
                    None => "none",
                };
                out.push((b, link.to_string(), lat_us, gbs, offset));
            } else if me == b {
                let mut t = [0f64; 1];
                for _ in 0..PINGS {
                    comm.recv(&mut t, a)?;
                    comm.send(&[wall_ms() + offset_ms], a)?;
                }
                for _ in 0..BW_ROUNDS {
                    comm.recv(&mut big, a)?;
                }
                comm.send(&[0f64], a)?;
            }
        }
    }
    Ok(out)
}

/// Every rank's findings on every rank: lengths, then the padded JSON texts.
fn all_gather(comm: &Communicator, mine: &Findings) -> hetccl::Result<Vec<Findings>> {
    let n = comm.world_size();
    let text = serde_json::to_vec(mine).unwrap_or_default();
    let mut lens = vec![0u64; n];
    comm.all_gather(&[text.len() as u64], &mut lens)?;
    let max = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut block = text;
    block.resize(max, 0);
    let mut all = vec![0u8; max * n];
    comm.all_gather(&block, &mut all)?;
    Ok((0..n)
        .map(|r| {
            let bytes = &all[r * max..r * max + lens[r] as usize];
            serde_json::from_slice(bytes).unwrap_or_default()
        })
        .collect())
}

/// The checks across ranks: every rank's own rows folded into one line each, then
/// connectivity, bandwidth and latency, MTU and clock skew.
fn fold(all: &[Findings]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let checks: Vec<String> = all
        .first()
        .map(|f| f.rows.iter().map(|r| r.check.clone()).collect())
        .unwrap_or_default();
    for check in checks {
        let of: Vec<(usize, &Row)> = all
            .iter()
            .filter_map(|f| {
                f.rows
                    .iter()
                    .find(|r| r.check == check)
                    .map(|r| (f.rank, r))
            })
            .collect();
        let worst = of.iter().map(|(_, r)| r.status).max().unwrap_or(Status::Ok);
        let bad: Vec<&(usize, &Row)> = of.iter().filter(|(_, r)| r.status == worst).collect();
        let (found, fix) = if worst == Status::Ok || all.len() == 1 {
            (bad[0].1.found.clone(), bad[0].1.fix.clone())
        } else {
            let ranks: Vec<String> = bad.iter().map(|(k, _)| k.to_string()).collect();
            (
                format!("rank(s) {}: {}", ranks.join(", "), bad[0].1.found),
                bad[0].1.fix.clone(),
            )
        };
        rows.push(Row {
            check,
            status: worst,
            found,
            fix,
        });
    }
    let n = all.len();
    rows.push(row(
        "connectivity",
        Status::Ok,
        format!(
            "all {n} ranks joined; every pair exchanged messages, every connection authenticated"
        ),
        "",
    ));
    let host = |r: usize| all.get(r).map(|f| f.host.as_str());
    let pairs: Vec<(usize, usize, &str, f64, f64)> = all
        .iter()
        .flat_map(|f| {
            f.pairs
                .iter()
                .map(move |p| (f.rank, p.0, p.1.as_str(), p.2, p.3))
        })
        .collect();
    if !pairs.is_empty() {
        for link in ["shm", "tcp"] {
            let of: Vec<_> = pairs.iter().filter(|p| p.2 == link).collect();
            if of.is_empty() {
                continue;
            }
            let slow = of.iter().min_by(|x, y| x.4.total_cmp(&y.4)).copied();
            let fast = of.iter().map(|p| p.4).fold(0.0, f64::max);
            let lat = of.iter().map(|p| p.3).fold(0.0, f64::max);
            if let Some(s) = slow {
                let found = format!(
                    "{} pair(s) over {link}: {:.2} to {fast:.2} GB/s (slowest {}-{}), latency up to {lat:.0} us",
                    of.len(),
                    s.4,
                    s.0,
                    s.1
                );
                // A pair of nodes far below the others of its kind: a slow NIC, a bad
                // cable, a throttled link. Inside one host the spread is the scheduler's
                // (pairs share cores), not a fault.
                if s.4 < fast / 4.0 && of.len() > 1 && host(s.0) != host(s.1) {
                    rows.push(row(
                        "bandwidth",
                        Status::Warn,
                        found,
                        format!("ranks {} and {} are much slower than the other pairs: check their link", s.0, s.1),
                    ));
                } else {
                    rows.push(row("bandwidth", Status::Ok, found, ""));
                }
            }
        }
    }
    let mtus: Vec<(usize, &str, u32)> = all
        .iter()
        .filter_map(|f| f.iface.as_ref().map(|(i, m)| (f.rank, i.as_str(), *m)))
        .collect();
    let distinct: std::collections::BTreeSet<u32> = mtus.iter().map(|m| m.2).collect();
    if distinct.len() > 1 {
        let list: Vec<String> = mtus
            .iter()
            .map(|(r, i, m)| format!("rank {r} {i} {m}"))
            .collect();
        // Frames the larger side sends whole are dropped or fragmented on the way into
        // the smaller: TCP stalls when path MTU discovery is blocked. A job fails or crawls.
        let low = distinct.first().copied().unwrap_or(0);
        rows.push(row(
            "MTU",
            Status::Fail,
            format!("the interfaces differ: {}", list.join(", ")),
            format!(
                "set one MTU on every rank's interface (ip link set dev IF mtu {low} on the \
                 others, or raise the smaller ones and the switch): a mismatch drops or \
                 fragments large frames"
            ),
        ));
    } else if let Some(m) = distinct.first() {
        rows.push(row(
            "MTU",
            Status::Ok,
            format!("{m} on every rank's interface"),
            "",
        ));
    }
    // Clock offsets are measured by rank 0 against each other rank.
    let skew = all
        .first()
        .map(|f| f.pairs.iter().map(|p| p.4.abs()).fold(0.0, f64::max))
        .unwrap_or(0.0);
    let found = format!("largest offset from rank 0: {skew:.1} ms");
    let fix = "synchronise the clocks (chrony or ntpd on every node): traces and hang reports \
               compare the ranks' times";
    rows.push(if skew > 1000.0 {
        row("clock skew", Status::Fail, found, fix)
    } else if skew > 50.0 {
        row("clock skew", Status::Warn, found, fix)
    } else {
        row("clock skew", Status::Ok, found, "")
    });
    rows
}

/// The table: one line per check, the fix indented below a line that is not ok.
pub fn table(rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.check.len()).max().unwrap_or(0);
    let mut t = String::new();
    for r in rows {
        let _ = writeln!(t, "  {:<w$}  {:<4}  {}", r.check, r.status.word(), r.found);
        if r.status != Status::Ok && !r.fix.is_empty() {
            let _ = writeln!(t, "  {:<w$}        fix: {}", "", r.fix);
        }
    }
    t
}

fn exit_code(rows: &[Row]) -> i32 {
    i32::from(rows.iter().any(|r| r.status == Status::Fail))
}

/// `hetccl doctor`: runs the checks on this rank and with the others; returns the exit code.
pub fn cli(args: &[std::ffi::OsString]) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        hetccl::outln!("{USAGE}");
        return 0;
    }
    if let Some(a) = args.first() {
        hetccl::errln!("hetccl doctor: unknown argument {a:?}\n\n{USAGE}");
        return 2;
    }
    let started = Instant::now();
    let mut cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            let rows = [row(
                "configuration",
                Status::Fail,
                e.to_string(),
                "fix the variable named above",
            )];
            hetccl::errln!("hetccl doctor:\n{}", table(&rows));
            return 1;
        }
    };
    let rank = cfg.launch.rank.unwrap_or(0);
    let world = cfg.launch.world_size.unwrap_or(1);
    let local = cfg.launch.local_world_size.unwrap_or(world);
    let (iface_row, iface) = check_interface(&cfg);
    let mut rows = vec![
        check_shm(&cfg, "/dev/shm", local),
        check_memlock(&cfg, soft_limit(libc::RLIMIT_MEMLOCK)),
        check_nofile(&cfg, world, soft_limit(libc::RLIMIT_NOFILE)),
        iface_row,
        check_job_key(&cfg, world),
        check_gpus(),
        check_gpu_ipc(cfg.launch.local_rank.unwrap_or(0), local),
        check_pinned(&cfg),
    ];
    // What failed alone is left out of the rest, so the rest can still be checked.
    if rows[0].status == Status::Fail {
        cfg.shm_disable = true;
    }
    if rows[3].status == Status::Fail {
        cfg.socket_ifname = None;
    }
    // Without the key the bootstrap refuses at once: its row says why and how to fix it.
    if rows[4].status == Status::Fail {
        hetccl::errln!("hetccl doctor (rank {rank} alone):\n{}", table(&rows));
        return 1;
    }
    let clock_offset_ms = cfg.doctor_clock_offset_ms;
    let comm = match Communicator::init(cfg) {
        Ok(c) => c,
        Err(e) => {
            rows.push(row(
                "connectivity",
                Status::Fail,
                format!(
                    "rank {rank} could not join the other ranks after {:.1} s: {e}",
                    started.elapsed().as_secs_f64()
                ),
                "start every rank with the same MASTER_ADDR, MASTER_PORT and job; check that \
                 the named host is up and its port reachable (firewall, HETCCL_SOCKET_IFNAME); \
                 raise HETCCL_CONNECT_TIMEOUT if ranks start far apart",
            ));
            hetccl::errln!("hetccl doctor (rank {rank} alone):\n{}", table(&rows));
            return 1;
        }
    };
    let rank = comm.rank();
    let measured = exchange(&comm, clock_offset_ms);
    let mine = Findings {
        rank,
        host: hetccl::topology::hostname(),
        rows,
        iface,
        pairs: measured.as_ref().cloned().unwrap_or_default(),
    };
    let all = match measured.and_then(|_| all_gather(&comm, &mine)) {
        Ok(a) => a,
        Err(e) => {
            let mut rows = mine.rows;
            rows.push(row(
                "connectivity",
                Status::Fail,
                format!("the all-pairs exchange failed: {e}"),
                "see the rank the error names: its host, its link, its limits",
            ));
            hetccl::errln!("hetccl doctor (rank {rank}):\n{}", table(&rows));
            return 1;
        }
    };
    let rows = fold(&all);
    let code = exit_code(&rows);
    if rank == 0 {
        let hosts: std::collections::BTreeSet<&str> = all.iter().map(|f| f.host.as_str()).collect();
        hetccl::outln!(
            "hetccl doctor: {} rank(s) on {} host(s), {:.1} s\n{}{}",
            all.len(),
            hosts.len(),
            started.elapsed().as_secs_f64(),
            table(&rows),
            if code == 0 {
                "all checks passed"
            } else {
                "some checks FAILED"
            }
        );
    }
    // Let every rank finish with the others before any exits, so none sees a peer vanish.
    let _ = comm.barrier();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the GPU checks cannot run, each says why and is skipped: neither a pass
    /// nor a failure, and no fix to follow.
    #[test]
    fn without_a_cuda_driver_the_gpu_checks_are_skipped_with_the_reason() {
        #[cfg(feature = "cuda")]
        // SAFETY: only tries to dlopen the driver library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            hetccl_testkit::skip("a CUDA driver library is present: the checks run");
            return;
        }
        let why = if cfg!(feature = "cuda") {
            "not checked: no CUDA driver library (libcuda.so) on this host"
        } else {
            "not checked: built without the cuda feature (host collectives only)"
        };
        let cfg = Config::default();
        let rows = [check_gpus(), check_gpu_ipc(1, 4), check_pinned(&cfg)];
        for (r, check) in rows.iter().zip(["GPUs", "GPU IPC", "pinned memory"]) {
            assert_eq!(r, &row(check, Status::Skip, why, ""));
        }
        // Skipped rows fail nothing, and the table says "skipped".
        assert_eq!(exit_code(&rows), 0);
        let t = table(&rows);
        assert!(t.contains("GPU IPC        skipped  "), "{t}");
    }

    /// The job key check fails exactly where the bootstrap would refuse: several
    /// ranks, no key, and nothing that puts them all on one host.
    #[test]
    fn a_job_across_hosts_without_a_key_fails_and_one_host_or_a_key_passes() {
        let cfg = |extra: &[(&str, &str)]| {
            let mut m: std::collections::HashMap<String, String> = [
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("LOCAL_WORLD_SIZE", "1"),
                ("MASTER_ADDR", "node0"),
                ("MASTER_PORT", "29500"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            for (k, v) in extra {
                m.insert(k.to_string(), v.to_string());
            }
            Config::from_vars(&m).unwrap()
        };
        let r = check_job_key(&cfg(&[]), 2);
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.found,
            "HETCCL_JOB_KEY unset, and 2 ranks (from torchrun variables) may run on several \
             hosts: MASTER_ADDR is node0, and the launcher does not say that every rank is on \
             one host: the bootstrap refuses to start"
        );
        assert!(r
            .fix
            .contains("Set HETCCL_JOB_KEY to the same secret on every rank"));
        for (extra, found) in [
            (
                &[("HETCCL_JOB_KEY", "0123456789abcdef0123456789abcdef")][..],
                "HETCCL_JOB_KEY set (32 characters)",
            ),
            (
                &[("LOCAL_WORLD_SIZE", "2")][..],
                "HETCCL_JOB_KEY unset: one host's ranks share a private key file (across hosts \
                 the bootstrap refuses to start without a key)",
            ),
            (
                &[("MASTER_ADDR", "127.0.0.1")][..],
                "HETCCL_JOB_KEY unset: one host's ranks share a private key file (across hosts \
                 the bootstrap refuses to start without a key)",
            ),
        ] {
            let r = check_job_key(&cfg(extra), 2);
            assert_eq!(
                (r.status, r.found.as_str()),
                (Status::Ok, found),
                "{extra:?}"
            );
        }
    }

    #[test]
    fn limits_below_the_need_fail_with_the_fix() {
        let cfg = Config::default();
        let r = check_memlock(&cfg, Some(64 << 10));
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.found,
            "ulimit -l is 64 KiB, below the 4.0 MiB of pinned staging buffers a device collective locks"
        );
        assert!(
            r.fix
                .starts_with("raise the locked-memory limit to at least 4.0 MiB"),
            "{}",
            r.fix
        );
        assert_eq!(check_memlock(&cfg, Some(u64::MAX)).status, Status::Ok);
        let r = check_nofile(&cfg, 8, Some(50));
        assert_eq!(r.status, Status::Fail);
        assert_eq!(
            r.found,
            "ulimit -n is 50, below the 88 descriptors 8 ranks need"
        );
        assert_eq!(check_nofile(&cfg, 8, Some(200)).status, Status::Warn);
        assert_eq!(check_nofile(&cfg, 8, Some(1 << 20)).status, Status::Ok);
    }

    #[test]
    fn a_small_shm_fails_naming_what_is_planned() {
        let cfg = Config::default();
        let dir = std::env::temp_dir();
        let free = fs_free(dir.to_str().unwrap()).unwrap();
        let seg = ShmGeometry::from_config(&cfg, false).segment_bytes() as u64;
        // Enough ranks that their segments outgrow the free space.
        let ranks = ((2 * free / seg) as f64).sqrt() as usize + 2;
        let r = check_shm(&cfg, dir.to_str().unwrap(), ranks);
        assert_eq!(r.status, Status::Fail, "{r:?}");
        assert!(r.fix.starts_with("enlarge"), "{}", r.fix);
        assert_eq!(check_shm(&cfg, "/no/such/dir", 2).status, Status::Fail);
        assert_eq!(check_shm(&cfg, dir.to_str().unwrap(), 1).status, Status::Ok);
    }

    #[test]
    fn a_wrong_interface_name_lists_the_real_ones() {
        let cfg = Config {
            socket_ifname: Some("nosuchif0".into()),
            ..Config::default()
        };
        let (r, i) = check_interface(&cfg);
        assert_eq!(r.status, Status::Fail);
        assert!(
            r.found
                .starts_with("HETCCL_SOCKET_IFNAME=nosuchif0: no interface"),
            "{}",
            r.found
        );
        assert!(r.fix.contains("lo"), "{}", r.fix);
        assert_eq!(i, None);
        let (r, i) = check_interface(&Config::default());
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(i.map(|i| i.0), Some("lo".to_string()));
    }

    #[test]
    fn the_worst_rank_speaks_for_a_check_and_a_failure_fails_the_run() {
        let f = |rank: usize, status| Findings {
            rank,
            rows: vec![row("open files", status, format!("r{rank}"), "ulimit -n")],
            iface: Some(("lo".into(), 65536)),
            ..Findings::default()
        };
        let rows = fold(&[f(0, Status::Ok), f(1, Status::Fail), f(2, Status::Fail)]);
        assert_eq!(rows[0].status, Status::Fail);
        assert_eq!(rows[0].found, "rank(s) 1, 2: r1");
        assert_eq!(exit_code(&rows), 1);
        let t = table(&rows);
        assert!(t.contains("open files    FAIL  rank(s) 1, 2: r1\n"), "{t}");
        assert!(t.contains("fix: ulimit -n"), "{t}");
        let mut g = f(1, Status::Ok);
        g.iface = Some(("eth0".into(), 1500));
        let rows = fold(&[f(0, Status::Ok), g]);
        let mtu = rows.iter().find(|r| r.check == "MTU").unwrap();
        assert_eq!(mtu.status, Status::Fail);
        assert_eq!(
            mtu.found,
            "the interfaces differ: rank 0 lo 65536, rank 1 eth0 1500"
        );
        assert!(
            mtu.fix.starts_with(
                "set one MTU on every rank's interface (ip link set dev IF mtu 1500 on the others"
            ),
            "{}",
            mtu.fix
        );
        assert_eq!(exit_code(&rows), 1);
    }
}
