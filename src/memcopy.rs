//! Copies with ordinary or streaming (non-temporal) stores: the one memory primitive
//! below every layer that moves bytes (the reductions, the executor, the
//! shared-memory rings).

/// Copies `len` bytes with streaming (non-temporal) stores where the CPU has them:
/// the destination's lines are written without being read first and without
/// evicting anything from the cache, which saves one memory read per byte when the
/// destination is not in cache and will not be read again soon (the other ranks'
/// parts of a large all-reduce). Ends with a store fence, so a later release store
/// publishes the data like after an ordinary copy.
///
/// # Safety
/// `src` must be valid for `len` reads and `dst` for `len` writes, not overlapping.
pub unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Ordinary stores up to the first 64-byte boundary of `dst`, and for the tail.
        let head = (dst.align_offset(64)).min(len);
        // SAFETY: the caller's contract covers every byte touched below: `head + 64 * k
        // + tail == len`.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, head);
            let (mut s, mut d) = (src.add(head), dst.add(head));
            let blocks = (len - head) / 64;
            for _ in 0..blocks {
                let a = _mm_loadu_si128(s.cast::<__m128i>());
                let b = _mm_loadu_si128(s.add(16).cast::<__m128i>());
                let c = _mm_loadu_si128(s.add(32).cast::<__m128i>());
                let e = _mm_loadu_si128(s.add(48).cast::<__m128i>());
                _mm_stream_si128(d.cast::<__m128i>(), a);
                _mm_stream_si128(d.add(16).cast::<__m128i>(), b);
                _mm_stream_si128(d.add(32).cast::<__m128i>(), c);
                _mm_stream_si128(d.add(48).cast::<__m128i>(), e);
                s = s.add(64);
                d = d.add(64);
            }
            std::ptr::copy_nonoverlapping(s, d, len - head - 64 * blocks);
            _mm_sfence();
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len)
    };
}

/// Copies `len` bytes, with [`copy_streaming`] when `streaming` is set and an ordinary
/// copy otherwise.
///
/// # Safety
/// As for [`copy_streaming`].
#[inline]
pub unsafe fn copy_bytes(dst: *mut u8, src: *const u8, len: usize, streaming: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        if streaming {
            copy_streaming(dst, src, len)
        } else {
            std::ptr::copy_nonoverlapping(src, dst, len)
        }
    }
}
