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
    /// threads at once: the order of their calls would differ between ranks. Shared with
    /// the device communicators made on it (`hetcclDeviceCommInit`).
    pub comm: Arc<Communicator>,
}

/// Live objects behind one kind of C handle, by token.
pub(crate) struct Registry<E> {
    live: Mutex<BTreeMap<usize, Arc<E>>>,
    /// What a stale handle is not ("communicator", "device communicator").
    kind: &'static str,
}

// Token values step by 16 from 0x10, so they look like aligned addresses in a debugger
// and the low bits being set betrays a corrupted handle at a glance. One counter serves
// every kind of handle, so a handle of one kind is never a live one of another.
static NEXT: AtomicUsize = AtomicUsize::new(1);

impl<E> Registry<E> {
    pub(crate) const fn new(kind: &'static str) -> Self {
        Registry {
            live: Mutex::new(BTreeMap::new()),
            kind,
        }
    }

    fn live(&self) -> MutexGuard<'_, BTreeMap<usize, Arc<E>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `entry` and returns its new token.
    pub(crate) fn insert(&self, entry: E) -> usize {
        let token = NEXT.fetch_add(1, Ordering::Relaxed) << 4;
        self.live().insert(token, Arc::new(entry));
        token
    }

    /// The entry behind `token`, for one call of C function `func`; `name` is the
    /// argument's name in errors.
    pub(crate) fn lookup(
        &self,
        func: &'static str,
        name: &str,
        token: usize,
    ) -> Result<Arc<E>, Failure> {
        self.take(func, name, token, |live| live.get(&token).cloned())
    }

    /// Removes `token`; the entry is dropped once calls still running on other threads
    /// have returned.
    pub(crate) fn remove(
        &self,
        func: &'static str,
        name: &str,
        token: usize,
    ) -> Result<Arc<E>, Failure> {
        self.take(func, name, token, |live| live.remove(&token))
    }

    /// `get` on the live entries, refusing NULL and a token that is not live.
    fn take(
        &self,
        func: &'static str,
        name: &str,
        token: usize,
        get: impl FnOnce(&mut BTreeMap<usize, Arc<E>>) -> Option<Arc<E>>,
    ) -> Result<Arc<E>, Failure> {
        if token == 0 {
            return Err(Failure::invalid(func, format!("{name} is NULL")));
        }
        get(&mut self.live()).ok_or_else(|| {
            Failure::invalid(
                func,
                format!(
                    "{name} {:p} is not a live {} (it was destroyed, or never created)",
                    token as *const u8, self.kind
                ),
            )
        })
    }

    /// Number of live entries.
    pub(crate) fn len(&self) -> usize {
        self.live().len()
    }
}

static LIVE: Registry<Entry> = Registry::new("communicator");

/// Registers a communicator and returns its new handle. Embedders that built a
/// [`Communicator`] in Rust can hand it to C code this way.
pub fn register(comm: Communicator) -> hetcclComm_t {
    let entry = Entry {
        rank: comm.rank(),
        world_size: comm.world_size(),
        comm: Arc::new(comm),
    };
    LIVE.insert(entry) as hetcclComm_t
}

/// The communicator behind a handle, for one call of C function `func`.
pub fn lookup(func: &'static str, h: hetcclComm_t) -> Result<Arc<Entry>, Failure> {
    LIVE.lookup(func, "comm", h as usize)
}

/// Removes a handle; the communicator shuts down once calls still running on other
/// threads have returned (and the device communicators made on it are destroyed).
pub fn unregister(func: &'static str, h: hetcclComm_t) -> Result<Arc<Entry>, Failure> {
    LIVE.remove(func, "comm", h as usize)
}

/// Number of live communicators (tests check destroy releases them).
pub fn live_count() -> usize {
    LIVE.len()
}
