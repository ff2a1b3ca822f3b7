//! Where a host's ranks start to run: one core each.
//!
//! Two ranks that exchange through shared memory and sleep while they wait can settle
//! on one core and stay there. Each hands the core to the other at every exchange, so
//! the scheduler never sees two runnable tasks on one core beside an idle one, and
//! moves neither; and a task that ran a moment ago counts as cache-hot, so even when
//! it does see them it waits. Measured on a 2-core machine: in 3 of 15 launches both
//! ranks of `hetccl-perf` ran their small all-reduces on one core, at 4.8 µs a call
//! instead of 0.25, for the whole launch. So at init every rank of a host that has a
//! core for each of its ranks moves to the core of its local index, and then gets its
//! whole CPU set back: from there the scheduler keeps them apart (it has no reason to
//! bring two busy tasks together), and remains free to move them away from other work,
//! which a pinned rank could not.

use std::mem::size_of;

/// The core a rank with local index `local` of `locals` ranks moves to, among the cores
/// its process may use (`allowed`, ascending); `None` leaves it where it is: a host of
/// one rank, ranks that outnumber the cores (they share cores whatever is done), or a
/// CPU set chosen for the rank (a launcher's binding to one core).
pub fn home_core(allowed: &[usize], local: usize, locals: usize) -> Option<usize> {
    if locals < 2 || allowed.len() < locals || local >= locals {
        return None;
    }
    Some(allowed[local])
}

/// The cores the calling thread may run on, ascending; `None` when the system will not
/// say.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // the size passed, the set's own, for the calling thread (0).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    Some(
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `c` is below CPU_SETSIZE, inside the set.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect(),
    )
}

/// The CPU set of `cpus` (each below `CPU_SETSIZE`, as [`allowed_cpus`] gives them;
/// others are left out).
pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Restricts the calling thread to `set`; returns once it runs inside it.
pub fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: the set is valid for its size; 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves the calling thread to [`home_core`] and gives it back its CPU set; returns the
/// core it moved to, or `None` when it left it where it was. A failed system call only
/// costs the placement (it is logged).
pub fn spread(local: usize, locals: usize) -> Option<usize> {
    let Some(allowed) = allowed_cpus() else {
        tracing::debug!(
            "placement: sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        return None;
    };
    let home = home_core(&allowed, local, locals)?;
    let moved = set_affinity(&cpu_set(&[home]));
    if let Err(e) = set_affinity(&cpu_set(&allowed)) {
        tracing::warn!(
            "placement: could not give this thread its CPU set back ({e}); it stays on core {home}"
        );
    }
    match moved {
        Ok(()) => {
            tracing::debug!("placement: local rank {local} of {locals} moved to core {home}");
            Some(home)
        }
        Err(e) => {
            tracing::debug!("placement: moving to core {home}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_rank_gets_its_own_core_when_there_are_enough() {
        let cores = [0, 1, 4, 5];
        assert_eq!(home_core(&cores, 0, 2), Some(0));
        assert_eq!(home_core(&cores, 1, 2), Some(1));
        assert_eq!(home_core(&cores, 3, 4), Some(5));
    }

    #[test]
    fn no_move_for_one_rank_too_many_ranks_or_a_bound_rank() {
        assert_eq!(home_core(&[0, 1], 0, 1), None);
        assert_eq!(home_core(&[0, 1], 2, 3), None);
        assert_eq!(home_core(&[3], 1, 2), None);
        assert_eq!(home_core(&[0, 1], 2, 2), None);
    }

    fn allowed_now() -> Vec<usize> {
        allowed_cpus().expect("sched_getaffinity")
    }

    #[test]
    fn a_cpu_set_holds_the_cores_it_was_made_of() {
        let set = cpu_set(&[0, 3, libc::CPU_SETSIZE as usize]);
        let held: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect();
        assert_eq!(held, [0, 3]);
    }

    #[test]
    fn a_spread_thread_moves_and_keeps_its_cpu_set() {
        std::thread::spawn(|| {
            let before = allowed_now();
            let locals = before.len();
            if locals < 2 {
                return crate::test_skip::skip(&format!(
                    "{locals} allowed core(s): nothing to spread"
                ));
            }
            let last = locals - 1;
            assert_eq!(spread(last, locals), Some(before[last]));
            assert_eq!(allowed_now(), before);
            assert_eq!(spread(0, locals + 1), None);
            assert_eq!(allowed_now(), before);
        })
        .join()
        .unwrap();
    }
}
