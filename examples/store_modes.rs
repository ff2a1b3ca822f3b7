//! How fast shared-memory all-reduces run in each placement of two ranks' cores, with
//! the placement measured beside every round. `store_modes BYTES ROUNDS ITERS`, started
//! on both ranks of one host (`hetccl run -n 2 -- target/release/examples/store_modes
//! 1M 40 100`): every round first times a cache-line ping-pong between the two ranks
//! (2000 round trips through a page of `/dev/shm`; about 30–75 ns where their cores
//! share a last-level cache and 200–300 ns across dies on the 2-core guest of
//! `docs/PERFORMANCE.md`), then ITERS out-of-place f32 sum all-reduces, and rank 0
//! prints one line per round:
//!
//! ```text
//! round 0 pingpong 71 ns median 61.4 us busbw 17.08 GB/s
//! ```
//!
//! The placement changes within seconds there, faster than launches can be
//! alternated, so comparing `HETCCL_SHM_STORES=plain` against `auto` means sorting the
//! rounds of alternated launches by the ping-pong beside them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hetccl::{Communicator, ReduceOp};

mod common;
const ROUND_TRIPS: u64 = 2000;

/// A page of `/dev/shm` both ranks map; rank 0 names it and removes the name.
struct ProbePage {
    ptr: *mut u8,
    path: std::ffi::CString,
    owner: bool,
}

impl ProbePage {
    fn open(name: &str, owner: bool) -> std::io::Result<ProbePage> {
        let path = std::ffi::CString::new(format!("/dev/shm/{name}")).expect("no NUL in name");
        let flags = if owner {
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL
        } else {
            libc::O_RDWR
        };
        // SAFETY: plain system calls on a path we own; every result is checked.
        unsafe {
            let fd = libc::open(path.as_ptr(), flags, 0o600);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if owner && libc::ftruncate(fd, 4096) != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            if ptr == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            Ok(ProbePage {
                ptr: ptr.cast(),
                path,
                owner,
            })
        }
    }

    fn line(&self) -> &AtomicU64 {
        // SAFETY: the page is mapped, 4096 bytes, page-aligned, shared between the ranks
        // and only ever accessed through this atomic.
        unsafe { &*self.ptr.cast::<AtomicU64>() }
    }

    /// Mean round trip in ns: rank 0 and rank 1 pass a counter back and forth.
    fn pingpong(&self, me: u64) -> f64 {
        let line = self.line();
        let t0 = Instant::now();
        for k in 0..ROUND_TRIPS {
            let want = 2 * k + me;
            while line.load(Ordering::Acquire) != want {
                std::hint::spin_loop();
            }
            line.store(want + 1, Ordering::Release);
        }
        t0.elapsed().as_nanos() as f64 / ROUND_TRIPS as f64
    }
}

impl Drop for ProbePage {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `open`; removes the name rank 0 created.
        unsafe {
            libc::munmap(self.ptr.cast(), 4096);
            if self.owner {
                libc::unlink(self.path.as_ptr());
            }
        }
    }
}

fn main() -> hetccl::Result<()> {
    let bytes = common::size(1, 1 << 20);
    let rounds: usize = common::number(2, 40);
    let iters: usize = common::number(3, 100);
    let comm = Communicator::init_from_env()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    if n != 2 {
        eprintln!("store_modes runs on exactly 2 ranks (got {n})");
        std::process::exit(2);
    }
    let mut pid = [if rank == 0 {
        std::process::id() as f64
    } else {
        0.0
    }];
    comm.all_reduce(&mut pid, ReduceOp::Sum)?;
    let name = format!("hetccl-store-modes-{}", pid[0] as u64);
    let page = if rank == 0 {
        Some(ProbePage::open(&name, true))
    } else {
        None
    };
    comm.barrier()?;
    let page = match page {
        Some(p) => p,
        None => ProbePage::open(&name, false),
    }
    .unwrap_or_else(|e| {
        eprintln!("rank {rank}: cannot map /dev/shm/{name}: {e}");
        std::process::exit(1);
    });
    comm.barrier()?;
    let count = bytes / 4;
    let input: Vec<f32> = (0..count).map(|i| (rank + i % 3) as f32).collect();
    let mut output = vec![0f32; count];
    for round in 0..rounds {
        page.line().store(0, Ordering::Relaxed);
        comm.barrier()?;
        let pp = page.pingpong(rank as u64);
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            comm.barrier()?;
            let t0 = Instant::now();
            comm.all_reduce_into(&input, &mut output, ReduceOp::Sum)?;
            let mut dt = [t0.elapsed().as_secs_f64()];
            comm.all_reduce(&mut dt, ReduceOp::Max)?;
            times.push(dt[0]);
        }
        times.sort_by(f64::total_cmp);
        let med = times[iters / 2];
        if rank == 0 {
            println!(
                "round {round} pingpong {pp:.0} ns median {:.1} us busbw {:.2} GB/s",
                med * 1e6,
                bytes as f64 / med / 1e9
            );
        }
    }
    Ok(())
}
