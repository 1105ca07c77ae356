//! A tracing hypercall page: the page the kernel hands to the library, so that every
//! hypercall the library makes is counted before it reaches Xen.
//!
//! Entry `n` (at `n * 32`, as in Xen's page) is `lock incq COUNTS[n]; jmp <Xen's entry n>`.
//! It changes no register but the flags, which Xen's entries clobber anyway, so it honours
//! the same contract as Xen's page; the tests and the demo read the counters to say which
//! hypercalls an MSR access made.

use core::arch::global_asm;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use xenmsr_hypercall::HypercallPage;
use xenmsr_hypercall::{ENTRIES, ENTRY_SIZE};

/// Hypercalls made through the tracing page, by number.
static COUNTS: [AtomicU64; ENTRIES] = [const { AtomicU64::new(0) }; ENTRIES];

global_asm!(
    r#"
    .pushsection .text.pvk_trace_page, "ax", @progbits
    .p2align 12
pvk_trace_page:
    .set pvk_trace_n, 0
    .rept {entries}
    .p2align 5
    lock incq {counts} + 8 * pvk_trace_n(%rip)
    jmp xenmsr_hypercall_page + {entry_size} * pvk_trace_n
    .set pvk_trace_n, pvk_trace_n + 1
    .endr
    .p2align 12
pvk_trace_page_end:
    .popsection
    "#,
    counts = sym COUNTS,
    entries = const ENTRIES,
    entry_size = const ENTRY_SIZE,
    options(att_syntax)
);

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

/// Reads the counters.
pub fn snapshot() -> Snapshot {
    let mut s = [0; ENTRIES];
    for (slot, c) in s.iter_mut().zip(COUNTS.iter()) {
        *slot = c.load(Ordering::Relaxed);
    }
    Snapshot(s)
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
