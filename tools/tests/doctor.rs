//! `hetccl doctor` as a job: a healthy run passes, and each check that can be made to
//! fail here fails with its fix and a non-zero exit: a tiny /dev/shm (a mount namespace
//! with a 1 MiB tmpfs), a low locked-memory limit, a wrong interface name, a peer that
//! never joins, a store nobody serves, interfaces of different MTUs (two network
//! namespaces joined by a veth pair), ranks that may span hosts without a job key, and a
//! clock 5 s off (`HETCCL_DOCTOR_CLOCK_OFFSET_MS`).

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

fn doctor_bin() -> &'static str {
    launcher()
}

fn run_job(n: usize, env: &[(&str, &str)], memlock: Option<u64>) -> Output {
    let mut cmd = Command::new(launcher());
    cmd.args(["run", "-n", &n.to_string(), "--", doctor_bin(), "doctor"])
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(bytes) = memlock {
        // SAFETY: setrlimit between fork and exec only lowers this child's own limit.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The table's line of `check` (rank 0's), e.g. "open files  ok  ...".
fn line<'a>(t: &'a str, check: &str) -> &'a str {
    t.lines()
        .find(|l| {
            l.trim_start_matches("[rank 0]")
                .trim_start()
                .starts_with(check)
        })
        .unwrap_or_else(|| panic!("no {check:?} line:\n{t}"))
}

fn status_of(t: &str, check: &str) -> String {
    line(t, check)
        .trim_start_matches("[rank 0]")
        .trim_start()
        .strip_prefix(check)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_healthy_job_passes_every_check() {
    for shm in ["0", "1"] {
        let o = run_job(3, &[("HETCCL_SHM_DISABLE", shm)], None);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(0), "{t}");
        for check in [
            "/dev/shm",
            "locked memory",
            "open files",
            "interface",
            "job key",
            "connectivity",
            "MTU",
            "clock skew",
        ] {
            assert_eq!(status_of(&t, check), "ok", "{check}:\n{t}");
        }
        // Built without the cuda feature: the GPU checks are skipped, not passed.
        for check in ["GPUs", "GPU IPC", "pinned memory"] {
            assert_eq!(status_of(&t, check), "skipped", "{check}:\n{t}");
        }
        assert!(
            t.contains("not checked: built without the cuda feature (host collectives only)"),
            "{t}"
        );
        assert_eq!(
            t.matches("hetccl doctor: 3 rank(s) on 1 host(s)").count(),
            1,
            "{t}"
        );
        assert!(
            line(&t, "bandwidth").contains(if shm == "1" {
                "3 pair(s) over tcp"
            } else {
                "3 pair(s) over shm"
            }),
            "{t}"
        );
        assert!(
            line(&t, "interface").contains("lo (127.0.0.1, MTU 65536)"),
            "{t}"
        );
        assert!(t.contains("[rank 0] all checks passed"), "{t}");
    }
}

#[test]
fn a_low_locked_memory_limit_fails_with_the_fix() {
    let o = run_job(2, &[], Some(64 << 10));
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        line(&t, "locked memory").ends_with(
            "FAIL  rank(s) 0, 1: ulimit -l is 64 KiB, below the 4.0 MiB of pinned staging \
             buffers a device collective locks"
        ),
        "{t}"
    );
    assert!(
        t.contains("fix: raise the locked-memory limit to at least 4.0 MiB (ulimit -l unlimited"),
        "{t}"
    );
    assert!(t.contains("[rank 0] some checks FAILED"), "{t}");
}

#[test]
fn a_wrong_interface_fails_naming_the_real_ones() {
    let o = run_job(2, &[("HETCCL_SOCKET_IFNAME", "nosuchif0")], None);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        line(&t, "interface").contains(
            "FAIL  rank(s) 0, 1: HETCCL_SOCKET_IFNAME=nosuchif0: no interface of that name"
        ),
        "{t}"
    );
    assert!(
        t.contains("fix: set HETCCL_SOCKET_IFNAME to one of: "),
        "{t}"
    );
    assert!(t.contains("lo"), "{t}");
    // The other checks still ran, without the bad name.
    assert_eq!(status_of(&t, "connectivity"), "ok", "{t}");
}

#[test]
fn a_tiny_dev_shm_fails_and_the_rest_runs_over_tcp() {
    // A private mount namespace whose /dev/shm is a 1 MiB tmpfs; 3 ranks plan 3
    // segments of 4 MiB.
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            skip(&format!(
                "no mount namespace with a tmpfs here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return;
        }
        Err(e) => {
            skip(&format!("unshare cannot run: {e}"));
            return;
        }
    }
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {} run -n 3 -- {} doctor",
        launcher(),
        doctor_bin()
    );
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        line(&t, "/dev/shm").contains("FAIL  rank(s) 0, 1, 2: 1.0 MiB free in /dev/shm, 12.0 MiB planned (3 segment(s) of 4.0 MiB for 3 rank(s) on this host)"),
        "{t}"
    );
    assert!(
        t.contains("fix: enlarge /dev/shm to at least 12.0 MiB"),
        "{t}"
    );
    assert!(line(&t, "bandwidth").contains("over tcp"), "{t}");
}

#[test]
fn a_peer_that_never_joins_is_reported() {
    let port = free_port().to_string();
    let o = Command::new(doctor_bin())
        .arg("doctor")
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .env("HETCCL_JOB_KEY", "0123456789abcdef0123456789abcdef")
        .env("HETCCL_CONNECT_TIMEOUT", "2")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("hetccl doctor (rank 0 alone):"), "{t}");
    let l = line(&t, "connectivity");
    assert!(
        l.contains("FAIL  rank 0 could not join the other ranks after "),
        "{t}"
    );
    assert!(
        l.contains("rank(s) [1] never connected to the store"),
        "the missing rank is named: {t}"
    );
    assert!(
        t.contains("fix: start every rank with the same MASTER_ADDR, MASTER_PORT"),
        "{t}"
    );
}

#[test]
fn an_unreachable_store_is_reported() {
    let port = free_port().to_string();
    let o = Command::new(doctor_bin())
        .arg("doctor")
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .env("HETCCL_JOB_KEY", "0123456789abcdef0123456789abcdef")
        .env("HETCCL_CONNECT_TIMEOUT", "1")
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    let l = line(&t, "connectivity");
    assert!(
        l.contains("FAIL  rank 1 could not join the other ranks after "),
        "{t}"
    );
    assert!(
        l.contains(&format!("127.0.0.1:{port}")),
        "the address is named: {t}"
    );
}

#[test]
fn under_mpirun_a_healthy_job_passes() {
    let present = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        skip("no mpirun here");
        return;
    }
    // Only what finds programs: whatever reaches the ranks comes from mpirun.
    let mut c = Command::new("mpirun");
    c.env_clear();
    for k in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(k) {
            c.env(k, v);
        }
    }
    let o = c
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "3"])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .args(["--mca", "oob_tcp_if_include", "lo"])
        .args([doctor_bin(), "doctor"])
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert_eq!(
        t.matches("hetccl doctor: 3 rank(s) on 1 host(s)").count(),
        1,
        "{t}"
    );
    assert_eq!(status_of(&t, "connectivity"), "ok", "{t}");
    assert!(
        t.contains("HETCCL_JOB_KEY unset: one host's ranks share a private key file"),
        "{t}"
    );
    assert!(t.contains("all checks passed"), "{t}");
}

/// Two network namespaces `obs2<tag>a` and `obs2<tag>b` joined by a veth pair, 10.231.N.1
/// in the first and .2 in the second, with MTUs `mtu_a` and `mtu_b`; removed (with
/// their interfaces) when dropped. `None` (after a skip) without root or `ip netns`.
struct Netns {
    names: [String; 2],
    addrs: [String; 2],
}

impl Netns {
    fn new(tag: &str, subnet: u8, mtu_a: u32, mtu_b: u32) -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip("network namespaces need root");
            return None;
        }
        let names = [format!("obs2{tag}a"), format!("obs2{tag}b")];
        let addrs = [format!("10.231.{subnet}.1"), format!("10.231.{subnet}.2")];
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| e.to_string())
                .and_then(|o| {
                    if o.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
                    }
                })
        };
        for n in &names {
            let _ = ip(&["netns", "del", n]);
        }
        let ns = Netns { names, addrs };
        let (a, b) = (ns.names[0].as_str(), ns.names[1].as_str());
        let (va, vb) = (format!("{a}v"), format!("{b}v"));
        let steps: Vec<Vec<String>> = vec![
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", a],
            vec!["link", "set", &vb, "netns", b],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .chain(
            [(a, &va, &ns.addrs[0], mtu_a), (b, &vb, &ns.addrs[1], mtu_b)]
                .into_iter()
                .flat_map(|(n, v, addr, mtu)| {
                    [
                        format!("-n {n} link set lo up"),
                        format!("-n {n} link set {v} mtu {mtu}"),
                        format!("-n {n} addr add {addr}/24 dev {v}"),
                        format!("-n {n} link set {v} up"),
                    ]
                    .map(|s| s.split(' ').map(String::from).collect())
                }),
        )
        .collect();
        for s in &steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                skip(&format!("ip {}: {e}", s.join(" ")));
                return None;
            }
        }
        Some(ns)
    }

    /// Rank `r` of 2 in namespace `r`, started as a launcher on each of two hosts would
    /// (one rank per host), the store on the first namespace's address. The namespaces
    /// share this host's name and boot id, so `HETCCL_NODE_ID` makes them two nodes: the
    /// ranks listen on their veth addresses, not on loopback.
    fn doctor(&self, r: usize, port: &str, env: &[(&str, &str)]) -> std::process::Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[r], doctor_bin(), "doctor"])
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_RANK", "0")
            .env("LOCAL_WORLD_SIZE", "1")
            .env("MASTER_ADDR", &self.addrs[0])
            .env("MASTER_PORT", port)
            .env("HETCCL_NODE_ID", &self.names[r])
            .env("HETCCL_SHM_DISABLE", "1")
            .env("HETCCL_CONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        c.spawn().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

#[test]
fn interfaces_of_different_mtus_fail_with_the_fix() {
    let Some(ns) = Netns::new("m", 71, 9000, 1500) else {
        return;
    };
    let port = free_port().to_string();
    let key = [("HETCCL_JOB_KEY", "0123456789abcdef0123456789abcdef")];
    let children = [ns.doctor(0, &port, &key), ns.doctor(1, &port, &key)];
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let t = text(&outs[0]);
    for o in &outs {
        assert_eq!(o.status.code(), Some(1), "{t}\n{}", text(&outs[1]));
    }
    assert!(
        line(&t, "interface").contains(
            "ok    obs2mav (10.231.71.1, MTU 9000), the route to MASTER_ADDR 10.231.71.1"
        ),
        "{t}"
    );
    assert!(
        line(&t, "MTU")
            .ends_with("FAIL  the interfaces differ: rank 0 obs2mav 9000, rank 1 obs2mbv 1500"),
        "{t}"
    );
    assert!(
        t.contains(
            "fix: set one MTU on every rank's interface (ip link set dev IF mtu 1500 on the \
             others, or raise the smaller ones and the switch)"
        ),
        "{t}"
    );
    // The rest of the job is sound: the bytes crossed the veth pair.
    assert_eq!(status_of(&t, "connectivity"), "ok", "{t}");
    assert!(line(&t, "bandwidth").contains("1 pair(s) over tcp"), "{t}");
    assert!(t.contains("some checks FAILED"), "{t}");
}

#[test]
fn ranks_across_hosts_without_a_job_key_fail_with_the_fix() {
    let Some(ns) = Netns::new("k", 72, 1500, 1500) else {
        return;
    };
    let port = free_port().to_string();
    let children = [ns.doctor(0, &port, &[]), ns.doctor(1, &port, &[])];
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {t}");
        assert!(
            t.contains(&format!("hetccl doctor (rank {r} alone):")),
            "{t}"
        );
        assert!(
            line(&t, "job key").contains(
                "FAIL  HETCCL_JOB_KEY unset, and 2 ranks (from torchrun variables) may run on \
                 several hosts: MASTER_ADDR is 10.231.72.1, and the launcher does not say that \
                 every rank is on one host: the bootstrap refuses to start"
            ),
            "{t}"
        );
        assert!(
            t.contains("fix: Across hosts hetccl has no private channel to hand out a job key")
                && t.contains("Set HETCCL_JOB_KEY to the same secret on every rank"),
            "{t}"
        );
        // It did not try to join: no connectivity line to wait for.
        assert!(!t.contains("connectivity"), "{t}");
    }
}

#[test]
fn a_skewed_clock_fails_with_the_fix() {
    // Rank 1 answers the clock pings 5 s ahead.
    let script = format!(
        "[ \"$RANK\" = 1 ] && export HETCCL_DOCTOR_CLOCK_OFFSET_MS=5000; exec {} doctor",
        doctor_bin()
    );
    let o = Command::new(launcher())
        .args(["run", "-n", "2", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    let l = line(&t, "clock skew");
    let ms: f64 = l
        .split("largest offset from rank 0: ")
        .nth(1)
        .and_then(|s| s.strip_suffix(" ms"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{t}"));
    assert!(l.contains("FAIL  largest offset from rank 0: "), "{t}");
    assert!((4900.0..5100.0).contains(&ms), "{ms} ms:\n{t}");
    assert!(
        t.contains("fix: synchronise the clocks (chrony or ntpd on every node)"),
        "{t}"
    );
    // Nothing else failed.
    assert_eq!(t.lines().filter(|l| l.contains(" FAIL ")).count(), 1, "{t}");
}
