//! A tracing hypercall page: the page the kernel hands to the library, so that every
//! hypercall the library makes is counted, per vCPU, before it reaches Xen.
//!
//! Entry `n` (at `n * 32`, as in Xen's page) is `mov $n, %eax; jmp pvk_trace_common`. The
//! common path finds the vCPU from the stack pointer (as `smp::current_vcpu` does),
//! increments `COUNTS[vcpu][n]` and jumps to Xen's entry `n`. It changes only `rax` (which
//! Xen's entry sets to the hypercall number anyway) and the flags, so it honours the same
//! contract as Xen's page; the tests and the demo read the counters to say which
//! hypercalls an MSR access made on their vCPU.

use core::arch::global_asm;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use xenmsr_hypercall::HypercallPage;
use xenmsr_hypercall::{ENTRIES, ENTRY_SIZE};

use crate::smp::{CacheAligned, MAX_VCPUS, PerVcpu, STACK_SHIFT, vcpu_index};

/// Hypercalls made through the tracing page, by vCPU and number.
static COUNTS: PerVcpu<[AtomicU64; ENTRIES]> =
    [const { CacheAligned([const { AtomicU64::new(0) }; ENTRIES]) }; MAX_VCPUS];

const ROW_BYTES: usize = core::mem::size_of::<CacheAligned<[AtomicU64; ENTRIES]>>();

global_asm!(
    r#"
    .pushsection .text.pvk_trace_page, "ax", @progbits
    .p2align 12
pvk_trace_page:
    .set pvk_trace_n, 0
    .rept {entries}
    .p2align 5
    mov $pvk_trace_n, %eax
    jmp pvk_trace_common
    .set pvk_trace_n, pvk_trace_n + 1
    .endr
    .p2align 12
pvk_trace_page_end:

pvk_trace_common:
    push %rcx
    push %rdx
    lea pvk_stacks(%rip), %rdx
    mov %rsp, %rcx
    sub %rdx, %rcx
    shr ${stack_shift}, %rcx
    cmp ${max_vcpus}, %rcx
    jae 2f
    imul ${row_bytes}, %rcx, %rcx
    lea {counts}(%rip), %rdx
    add %rdx, %rcx
    lock incq (%rcx,%rax,8)
2:
    shl $5, %eax
    lea xenmsr_hypercall_page(%rip), %rdx
    add %rdx, %rax
    pop %rdx
    pop %rcx
    jmp *%rax
    .popsection
    "#,
    counts = sym COUNTS,
    entries = const ENTRIES,
    stack_shift = const STACK_SHIFT,
    max_vcpus = const MAX_VCPUS,
    row_bytes = const ROW_BYTES,
    options(att_syntax)
);

const _: () = assert!(ENTRY_SIZE == 32);

unsafe extern "C" {
    static pvk_trace_page: [u8; 4096];
}

/// The tracing page, as a hypercall page.
pub fn page() -> HypercallPage {
    let base = NonNull::new((&raw const pvk_trace_page).cast_mut().cast::<u8>())
        .expect("the tracing page has an address");
    // SAFETY: each 32-byte entry of `pvk_trace_page` increments a counter (touching only
    // the flags and `COUNTS`) and jumps to the same entry of Xen's page, so it honours
    // Xen's hypercall contract exactly as that entry does; the page is code in the image
    // for the kernel's whole life.
    unsafe { HypercallPage::from_raw(base) }
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot([u64; ENTRIES]);

/// Reads this vCPU's counters.
pub fn snapshot() -> Snapshot {
    let row = &COUNTS[vcpu_index()].0;
    Snapshot(core::array::from_fn(|n| row[n].load(Ordering::Relaxed)))
}

/// Puts this vCPU's counters back to `saved`.
pub fn restore(saved: &Snapshot) {
    let row = &COUNTS[vcpu_index()].0;
    for (c, v) in row.iter().zip(saved.0) {
        c.store(v, Ordering::Relaxed);
    }
}

impl Snapshot {
    /// The hypercalls made since `earlier`: `(number, count)` for each that changed.
    pub fn since(&self, earlier: &Snapshot) -> impl Iterator<Item = (u32, u64)> + '_ {
        let earlier = earlier.0;
        self.0.iter().enumerate().filter_map(move |(nr, &now)| {
            let d = now - earlier[nr];
            (d > 0).then_some((nr as u32, d))
        })
    }

    /// How many hypercalls in all were made since `earlier`.
    pub fn total_since(&self, earlier: &Snapshot) -> u64 {
        self.since(earlier).map(|(_, d)| d).sum()
    }

    /// How many hypercalls number `nr` were made since `earlier`.
    pub fn count_since(&self, earlier: &Snapshot, nr: u32) -> u64 {
        self.since(earlier)
            .find(|&(n, _)| n == nr)
            .map_or(0, |(_, d)| d)
    }
}
