//! The raw buffers a schedule addresses (input, output, scratch), and the bounds check
//! every region passes before any op runs.

use crate::algorithm::schedule::{BufId, Region};
use crate::error::{Error, Result};

/// Raw views of the buffers a schedule addresses.
///
/// The communicator guarantees they stay valid and unaliased (except input == output
/// for in-place calls, which schedules never read as `Input`) until `execute` returns.
pub struct Buffers {
    /// Caller's send buffer.
    pub input: *const u8,
    /// Its length in bytes.
    pub input_len: usize,
    /// Caller's receive buffer.
    pub output: *mut u8,
    /// Its length in bytes.
    pub output_len: usize,
    /// Scratch.
    pub scratch: *mut u8,
    /// Its length in bytes.
    pub scratch_len: usize,
}

impl Buffers {
    pub(super) fn check(&self, r: &Region) -> Result<()> {
        let len = match r.buf {
            BufId::Input => self.input_len,
            BufId::Output => self.output_len,
            BufId::Scratch => self.scratch_len,
        };
        if r.offset.checked_add(r.len).is_none_or(|end| end > len) {
            return Err(Error::invalid(
                "execute",
                format!("schedule addresses {r:?} outside a buffer of {len} bytes"),
            ));
        }
        Ok(())
    }

    #[inline]
    pub(super) fn ptr(&self, r: &Region) -> *mut u8 {
        let base = match r.buf {
            BufId::Input => self.input as *mut u8,
            BufId::Output => self.output,
            BufId::Scratch => self.scratch,
        };
        if r.len == 0 {
            return std::ptr::NonNull::dangling().as_ptr();
        }
        // SAFETY: `check` proved offset + len lies inside the buffer.
        unsafe { base.add(r.offset) }
    }

    /// # Safety
    /// The region must have passed `check`, and no `&mut` to it may be live.
    #[inline]
    pub(super) unsafe fn slice(&self, r: &Region) -> &[u8] {
        // SAFETY: bounds checked; the caller rules out a live mutable alias.
        unsafe { std::slice::from_raw_parts(self.ptr(r), r.len) }
    }
}
