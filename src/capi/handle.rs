//! The registry of live communicators behind `hetcclComm_t` handles.
//!
//! A handle is a token, never a pointer to memory: its value is a number drawn from a
//! counter that never repeats. A destroyed (or never created) handle is therefore
//! *detected* — it is not in the registry — instead of being dereferenced, and a new
//! communicator can never inherit a stale handle's value the way a reused heap address
//! would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::status::Failure;
use crate::communicator::Communicator;

/// The opaque type behind `hetcclComm_t` (never instantiated).
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct hetcclComm {
    _opaque: [u8; 0],
}

/// `hetcclComm_t`: a communicator handle as C sees it.
#[allow(non_camel_case_types)]
pub type hetcclComm_t = *mut hetcclComm;

/// A live communicator, with rank and size copied out for the argument checks.
pub struct Entry {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// The communicator. Like an NCCL communicator it must not be driven by two
    /// threads at once: the order of their calls would differ between ranks.
    pub comm: Communicator,
}

static LIVE: Mutex<BTreeMap<usize, Arc<Entry>>> = Mutex::new(BTreeMap::new());

// Token values step by 16 from 0x10, so they look like aligned addresses in a debugger
// and the low bits being set betrays a corrupted handle at a glance.
static NEXT: AtomicUsize = AtomicUsize::new(1);

fn live() -> MutexGuard<'static, BTreeMap<usize, Arc<Entry>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a communicator and returns its new handle. Embedders that built a
/// [`Communicator`] in Rust can hand it to C code this way.
pub fn register(comm: Communicator) -> hetcclComm_t {
    let token = NEXT.fetch_add(1, Ordering::Relaxed) << 4;
    let entry = Entry {
        rank: comm.rank(),
        world_size: comm.world_size(),
        comm,
    };
    live().insert(token, Arc::new(entry));
    token as hetcclComm_t
}

/// The communicator behind a handle, for one call of C function `func`.
pub fn lookup(func: &'static str, h: hetcclComm_t) -> Result<Arc<Entry>, Failure> {
    if h.is_null() {
        return Err(Failure::invalid(func, "comm is NULL"));
    }
    live()
        .get(&(h as usize))
        .cloned()
        .ok_or_else(|| Failure::invalid(func, not_live(h)))
}

/// Removes a handle; the communicator shuts down once calls still running on other
/// threads have returned.
pub fn unregister(func: &'static str, h: hetcclComm_t) -> Result<Arc<Entry>, Failure> {
    if h.is_null() {
        return Err(Failure::invalid(func, "comm is NULL"));
    }
    live()
        .remove(&(h as usize))
        .ok_or_else(|| Failure::invalid(func, not_live(h)))
}

fn not_live(h: hetcclComm_t) -> String {
    format!("comm {h:p} is not a live communicator (it was destroyed, or never created)")
}

/// Number of live communicators (tests check destroy releases them).
pub fn live_count() -> usize {
    live().len()
}
