//! Large CPU buffers: zeroed without writing, backed by transparent huge pages where Linux
//! grants them.

use half::{bf16, f16};

/// Element types whose all-zero bit pattern is +0.0 and that can be handed out from a zeroed
/// allocation.
pub trait Zeroed: Copy + Sized {
    /// `n` zeros from an allocation the allocator may hand out as untouched, zero pages,
    /// advised for huge pages before anything touches them.
    fn zeroed_vec(n: usize) -> Vec<Self>;
}

impl Zeroed for f32 {
    fn zeroed_vec(n: usize) -> Vec<f32> {
        let raw = zeroed_words::<u32>(n);
        // SAFETY: f32 has u32's size and alignment, and all-zero bits are +0.0; the
        // allocation is handed over whole (length and capacity) from a Vec<u32> that will not
        // free it.
        unsafe { rebrand(raw) }
    }
}

impl Zeroed for u8 {
    fn zeroed_vec(n: usize) -> Vec<u8> {
        zeroed_words::<u8>(n)
    }
}

impl Zeroed for bf16 {
    fn zeroed_vec(n: usize) -> Vec<bf16> {
        halves_zeroed(n)
    }
}

impl Zeroed for f16 {
    fn zeroed_vec(n: usize) -> Vec<f16> {
        halves_zeroed(n)
    }
}

/// 16-bit floats that are `#[repr(transparent)]` over u16.
trait HalfBits {}
impl HalfBits for bf16 {}
impl HalfBits for f16 {}

/// `n` zeros of a 16-bit float type from a zeroed allocation of u16 (`vec![bf16::ZERO; n]`
/// would write every element).
fn halves_zeroed<T: HalfBits>(n: usize) -> Vec<T> {
    let raw = zeroed_words::<u16>(n);
    // SAFETY: T is a #[repr(transparent)] wrapper of u16 (same size and alignment, every bit
    // pattern valid, all-zero bits = +0.0); the allocation is handed over whole (length and
    // capacity) from a Vec<u16> that will not free it.
    unsafe { rebrand(raw) }
}

/// Reinterprets a Vec of words as a Vec of a same-sized type.
///
/// # Safety
/// `T` must have `W`'s size and alignment and accept every bit pattern of `W`.
unsafe fn rebrand<W, T>(raw: Vec<W>) -> Vec<T> {
    let mut raw = std::mem::ManuallyDrop::new(raw);
    let (ptr, len, cap) = (raw.as_mut_ptr() as *mut T, raw.len(), raw.capacity());
    // SAFETY: the caller vouches for the layouts; the allocation moves over whole, and
    // ManuallyDrop keeps the old Vec from freeing it.
    unsafe { Vec::from_raw_parts(ptr, len, cap) }
}

/// Unsigned words, whose all-zero bytes are the value 0.
trait Word: Copy + Default {}
impl Word for u8 {}
impl Word for u16 {}
impl Word for u32 {}

/// Capacity, in bytes, from which glibc's malloc always maps a fresh region (its largest
/// dynamic mmap threshold, `DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit).
const FRESH_MAP_BYTES: usize = 32 << 20;
/// Buffers from this size up get at least `FRESH_MAP_BYTES` of capacity.
const LARGE_BYTES: usize = 1 << 20;

/// `n` zero words from a zeroed allocation (calloc), advised for huge pages.
///
/// Below glibc's mmap threshold, calloc serves from the heap and must write zeros over a
/// reused chunk — a 1 GiB KV cache in 21 MB layers cost 0.3-0.6 s of start-up in 4 KB page
/// faults — and that threshold rises to the size of the largest mapped chunk ever freed (up to
/// 32 MiB), so a model's loading pushes it past a layer's size. Large buffers therefore ask
/// for at least 32 MiB of capacity: always a fresh mapping of zero pages, nothing written,
/// and capacity past `n` is address space only (never touched, never resident).
fn zeroed_words<W: Word>(n: usize) -> Vec<W> {
    let size = std::mem::size_of::<W>();
    let cap = if n * size >= LARGE_BYTES {
        n.max(FRESH_MAP_BYTES.div_ceil(size) + 1)
    } else {
        n
    };
    let layout = match std::alloc::Layout::array::<W>(cap) {
        Ok(layout) if cap > n => layout,
        _ => {
            let v = vec![W::default(); n];
            advise_huge(&v);
            return v;
        }
    };
    // SAFETY: the layout is non-zero-sized (cap > n ≥ 1 MiB / size); alloc_zeroed returns
    // memory of that layout with every byte zero, or null (handled). W is u8, u16 or u32, for
    // which all-zero bytes are the value 0, so the first n elements are initialized; the Vec
    // takes the allocation with the capacity it was allocated with, so it frees it with the
    // same layout.
    let v = unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut W;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(ptr, n, cap)
    };
    advise_huge(&v);
    v
}

/// Asks Linux to back `v`'s memory with transparent huge pages (where THP is in `madvise`
/// mode, the common default, nothing else does). Call before the memory is first touched.
/// Packed weights (~1 GB for a 0.5B model in bf16) then fault in 2 MB at a time instead of
/// 4 KB — most of `ember serve`'s start-up was the kernel handing out 4 KB pages — and a
/// decode step's scattered KV-cache blocks stop costing a TLB miss each. A hint only: failures
/// are ignored.
fn advise_huge<T>(v: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = v.as_ptr() as usize;
        let end = start + std::mem::size_of_val(v);
        let aligned = start.div_ceil(PAGE) * PAGE;
        if end > aligned + (2 << 20) {
            // SAFETY: madvise only changes how the kernel backs this range, which lies inside
            // `v`'s allocation (rounded inward to whole pages); it does not touch the contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    (end - aligned) / PAGE * PAGE,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Zeroed + PartialEq + std::fmt::Debug + Default>(n: usize) {
        let mut v = T::zeroed_vec(n);
        assert_eq!(v.len(), n);
        assert!(v.iter().all(|x| *x == T::default()), "{n} zeros");
        // The Vec owns its allocation like any other: it grows, and frees, normally.
        v.push(T::default());
        assert_eq!(v.len(), n + 1);
    }

    #[test]
    fn small_and_large_buffers_are_zero_and_owned() {
        for n in [
            0,
            1,
            1000,
            (1 << 20) / 2 - 1,
            (1 << 20) / 2,
            3 << 20,
            20 << 20,
        ] {
            check::<f32>(n);
            check::<bf16>(n);
            check::<f16>(n);
        }
    }
}
