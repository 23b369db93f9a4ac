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
        // `vec![0f32; n]` asks the allocator for zeroed memory (calloc): no write.
        let v = vec![0f32; n];
        advise_huge(&v);
        v
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

/// `n` zeros of a 16-bit float type from a zeroed allocation of u16 (`vec![0u16; n]` is a
/// calloc; `vec![bf16::ZERO; n]` would write every element).
fn halves_zeroed<T: HalfBits>(n: usize) -> Vec<T> {
    let raw = std::mem::ManuallyDrop::new(vec![0u16; n]);
    advise_huge(&raw);
    let (ptr, len, cap) = (raw.as_ptr() as *mut u16, raw.len(), raw.capacity());
    // SAFETY: T is a #[repr(transparent)] wrapper of u16 (same size and alignment, every bit
    // pattern valid, all-zero bits = +0.0); the allocation is handed over whole, with its length
    // and capacity, from a Vec<u16> that will not free it (ManuallyDrop).
    unsafe { Vec::from_raw_parts(ptr as *mut T, len, cap) }
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
