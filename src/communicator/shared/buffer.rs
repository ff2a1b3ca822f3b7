//! [`SharedBuf`], and the registry through which a collective finds the shared
//! allocation a caller's slice lies in, here and in every peer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::control::NodeCtl;
use crate::algorithm::call::NO_ROOT;
use crate::algorithm::executor::ExecCtx;
use crate::dtype::{CollectiveOp, Element};
use crate::error::AbortCause;
use crate::transport::shm::segment::Mapping;

/// One collective allocation: every local rank's buffer, mapped in this process.
pub(super) struct Allocation {
    pub(super) idx: u64,
    /// Indexed by local rank: this rank's read-write mapping, peers' read-only ones
    /// (`None` where buffers are not shared).
    pub(super) maps: Vec<Option<Mapping>>,
}

#[derive(Default)]
pub(super) struct Registry {
    /// Start address of this rank's buffer -> (end address, allocation index).
    pub(super) by_addr: BTreeMap<usize, (usize, u64)>,
    pub(super) by_idx: HashMap<u64, Weak<Allocation>>,
}

/// A communicator's shared allocations and control pages, also seen by its progress
/// thread.
pub(in crate::communicator) struct SharedState {
    pub(super) rank: usize,
    pub(in crate::communicator) ctl: OnceLock<NodeCtl>,
    registry: Mutex<Registry>,
    /// Next allocation index; held for the whole of an allocation so two threads
    /// cannot interleave their exchanges.
    pub(super) next_idx: Mutex<u64>,
    /// Collectives whose direct path has been logged.
    pub(super) logged: Mutex<HashSet<CollectiveOp>>,
    pub(super) eager_logged: AtomicBool,
}

impl SharedState {
    pub(in crate::communicator) fn new(rank: usize) -> Arc<Self> {
        Arc::new(SharedState {
            rank,
            ctl: OnceLock::new(),
            registry: Mutex::new(Registry::default()),
            next_idx: Mutex::new(0),
            logged: Mutex::new(Default::default()),
            eager_logged: AtomicBool::new(false),
        })
    }

    pub(super) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared allocation holding `bytes` bytes at `ptr`, and the offset of `ptr` in it.
    pub(super) fn lookup(&self, ptr: usize, bytes: usize) -> Option<(u64, usize)> {
        let reg = self.registry();
        let (&start, &(end, idx)) = reg.by_addr.range(..=ptr).next_back()?;
        (ptr.checked_add(bytes)? <= end).then_some((idx, ptr - start))
    }

    /// Called by the progress thread before it runs the collective of `ctx` over links,
    /// so a peer waiting for it on the control pages learns the two disagree, and on
    /// what (the root is not in the context: the peer names the call without it).
    pub(in crate::communicator) fn note_link_op(&self, ctx: &ExecCtx) {
        if let Some(c) = self.ctl.get() {
            c.note_link_op(&super::control::stated(ctx, NO_ROOT));
        }
    }

    /// Tells the peers this rank's communicator failed, and why.
    pub(in crate::communicator) fn abort(&self, cause: AbortCause) {
        if let Some(c) = self.ctl.get() {
            c.set_aborted(cause);
        }
    }

    /// Tells the peers this rank's communicator is gone (unless it aborted before).
    pub(in crate::communicator) fn close(&self) {
        if let Some(c) = self.ctl.get() {
            c.set_closed();
        }
    }
}

/// A buffer of `len` elements allocated by [`crate::Communicator::alloc_shared`]:
/// memory that every rank of this host can read, so collectives on it (or on a
/// sub-slice of it) take the direct path when all ranks share one host. Derefs to this
/// rank's `[T]`.
///
/// Zero-filled at allocation. It stays valid after the communicator is gone; dropping
/// it is local (no collective) and unmaps this rank's view of every rank's buffer.
pub struct SharedBuf<T: Element> {
    alloc: Arc<Allocation>,
    ptr: *mut T,
    len: usize,
    state: Weak<SharedState>,
    _owns: PhantomData<T>,
}

// SAFETY: the buffer is this process's exclusive view of its own memory (peers only
// read it, and only inside collectives that borrow it mutably); `T: Send + Sync`.
unsafe impl<T: Element> Send for SharedBuf<T> {}
// SAFETY: `&SharedBuf` only gives `&[T]`.
unsafe impl<T: Element> Sync for SharedBuf<T> {}

impl<T: Element> SharedBuf<T> {
    /// Registers `alloc`, whose mapping for this rank starts at `mine` and holds at
    /// least `len` elements, with `state`, and returns this rank's buffer.
    pub(super) fn register(
        state: &Arc<SharedState>,
        alloc: Allocation,
        mine: *mut u8,
        len: usize,
    ) -> SharedBuf<T> {
        let bytes = len * std::mem::size_of::<T>();
        let alloc = Arc::new(alloc);
        {
            let mut reg = state.registry();
            reg.by_addr
                .insert(mine as usize, (mine as usize + bytes, alloc.idx));
            reg.by_idx.insert(alloc.idx, Arc::downgrade(&alloc));
        }
        SharedBuf {
            alloc,
            ptr: mine.cast::<T>(),
            len,
            state: Arc::downgrade(state),
            _owns: PhantomData,
        }
    }

    /// Allocation number (equal on every rank for the same `alloc_shared` call).
    pub fn index(&self) -> u64 {
        self.alloc.idx
    }

    /// Whether peers of this host map this buffer (false for one rank alone, with
    /// `HETCCL_SHM_DISABLE=1`, or when this rank has no peer on its host).
    pub fn is_shared(&self) -> bool {
        self.alloc.maps.iter().filter(|m| m.is_some()).count() > 1
    }

    /// Whether the memory is backed by huge pages (hugetlb).
    pub fn huge_pages(&self) -> bool {
        self.alloc
            .maps
            .iter()
            .flatten()
            .next()
            .is_some_and(|m| m.huge_pages())
    }
}

impl<T: Element> std::ops::Deref for SharedBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points at `len` initialised (zero-filled, Pod) elements of this
        // rank's mapping, which `alloc` keeps alive; peers never write it.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Element> std::ops::DerefMut for SharedBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; `&mut self` makes this the only reference in-process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Element> std::fmt::Debug for SharedBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf")
            .field("index", &self.alloc.idx)
            .field("len", &self.len)
            .field("dtype", &T::DTYPE)
            .finish()
    }
}

impl<T: Element> Drop for SharedBuf<T> {
    fn drop(&mut self) {
        if let Some(s) = self.state.upgrade() {
            let mut reg = s.registry();
            reg.by_addr.remove(&(self.ptr as usize));
            reg.by_idx.remove(&self.alloc.idx);
        }
    }
}
