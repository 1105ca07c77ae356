//! The Xen PV policy: the backend the stubs consult on Xen PV.
//!
//! For each access it either answers (a hypercall, an ignored write, a fixed-up value, a
//! vPMU slot), says "do native" (the stub executes the real instruction, which Xen traps
//! and emulates), or fails with a typed error, which reaches the caller through the
//! stub's rewind path exactly like a native fault.

use xenmsr_asm::{MsrBackend, MsrError, Outcome};
use xenmsr_hypercall::HypercallPage;

use crate::dispatch::{Class, ClassIndex, reference_class};
use crate::pmu::{NativeMsr, PmuLayout, RawMsr, Vpmu};
use crate::routes::{self, ReadRoute, WriteRoute};

/// The routing policy of a Xen PV guest.
pub struct XenPvPolicy<N: NativeMsr + 'static = RawMsr> {
    hypercalls: HypercallPage,
    vcpu_id: fn() -> u32,
    native: N,
    pmu: Option<&'static Vpmu>,
    layout: PmuLayout,
    index: Option<&'static ClassIndex>,
}

impl<N: NativeMsr> core::fmt::Debug for XenPvPolicy<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenPvPolicy")
            .field("hypercalls", &self.hypercalls)
            .field("pmu", &self.pmu.is_some())
            .field("layout", &self.layout)
            .field("indexed", &self.index.map(ClassIndex::len))
            .finish()
    }
}

impl<N: NativeMsr> XenPvPolicy<N> {
    /// A policy that makes its hypercalls through `hypercalls`, learns the current vCPU
    /// from `vcpu_id` (for the APIC base's `BSP` bit), reads MSRs natively through
    /// `native`, and sends PMU MSRs and RDPMC to `pmu` (when `None`, they pass through;
    /// the vPMU knows the calling vCPU from its own configuration).
    ///
    /// Builds the one-probe class index for the routes and `pmu`'s layout in place, in
    /// `index` (about 5 KiB: a `static` holding [`ClassIndex::new`] in a kernel, so that
    /// nothing that large is ever on the stack). The policy is small and keeps a shared
    /// reference to it.
    pub fn new(
        hypercalls: HypercallPage,
        vcpu_id: fn() -> u32,
        native: N,
        pmu: Option<&'static Vpmu>,
        index: &'static mut ClassIndex,
    ) -> Self {
        let layout = pmu.map_or(PmuLayout::None, Vpmu::layout);
        let index = if index.rebuild(&layout) {
            Some(&*index)
        } else {
            None
        };
        XenPvPolicy {
            hypercalls,
            vcpu_id,
            native,
            pmu,
            layout,
            index,
        }
    }

    /// The class of `msr`, the routing decision: one probe of the index (or, for a
    /// layout too large to index, the equivalent two-step classification).
    #[inline]
    pub fn class(&self, msr: u32) -> Class {
        match self.index {
            Some(index) => index.lookup(msr),
            None => reference_class(&self.layout, msr),
        }
    }

    /// Decides a read. Public so that benchmarks and tests can drive the policy
    /// without a stub in between.
    ///
    /// # Safety
    ///
    /// As [`MsrBackend::read`]: the caller must be allowed to execute `rdmsr` of `msr`
    /// (the APIC base is read with the real instruction).
    #[inline]
    pub unsafe fn decide_read(&self, msr: u32) -> Outcome {
        match self.class(msr) {
            Class::Native
            | Class::Route {
                read: ReadRoute::Native,
                ..
            } => Outcome::Native,
            Class::Route {
                read: ReadRoute::ApicBaseFixup,
                ..
            // SAFETY: the caller may read `msr` (this function's contract).
            } => match unsafe { self.native.read_safe(msr) } {
                Ok(raw) => Outcome::Done(routes::fix_apic_base(raw, (self.vcpu_id)())),
                Err(error) => Outcome::Failed(error),
            },
            Class::Pmu(class) => match self.pmu {
                Some(pmu) => pmu.read_classified(class),
                None => Outcome::Native,
            },
        }
    }

    /// Decides a write, and performs it when the policy handles it (a segment-base
    /// hypercall, a vPMU write).
    ///
    /// # Safety
    ///
    /// As [`MsrBackend::write`]: the same contract as the native `wrmsr` of `value` to
    /// `msr` (a segment-base write changes what `%fs:`/`%gs:` accesses reach).
    #[inline]
    pub unsafe fn decide_write(&self, msr: u32, value: u64) -> Outcome {
        match self.class(msr) {
            Class::Native
            | Class::Route {
                write: WriteRoute::Native,
                ..
            } => Outcome::Native,
            Class::Route {
                write: WriteRoute::Ignore,
                ..
            } => Outcome::Done(0),
            Class::Route {
                write: WriteRoute::SegmentBase(which),
                ..
            // SAFETY: the caller upholds the native write's contract for this base.
            } => match unsafe { self.hypercalls.set_segment_base(which, value) } {
                Ok(()) => Outcome::Done(0),
                Err(errno) => Outcome::Failed(MsrError::Hypercall(errno)),
            },
            Class::Pmu(class) => match self.pmu {
                Some(pmu) => pmu.write_classified(class, value),
                None => Outcome::Native,
            },
        }
    }

    /// Decides an RDPMC. RDPMC always faults for a PV guest (Xen never sets CR4.PCE and
    /// does not emulate it), so without a vPMU backend it is left to fault natively.
    ///
    /// # Safety
    ///
    /// As [`MsrBackend::rdpmc`].
    #[inline]
    pub unsafe fn decide_rdpmc(&self, counter: u32) -> Outcome {
        match self.pmu {
            Some(pmu) => pmu.rdpmc(counter),
            None => Outcome::Native,
        }
    }
}

impl<N: NativeMsr> MsrBackend for XenPvPolicy<N> {
    unsafe fn read(&self, msr: u32) -> Outcome {
        // SAFETY: the same contract, forwarded.
        unsafe { self.decide_read(msr) }
    }

    unsafe fn write(&self, msr: u32, value: u64) -> Outcome {
        // SAFETY: the same contract, forwarded.
        unsafe { self.decide_write(msr, value) }
    }

    unsafe fn rdpmc(&self, counter: u32) -> Outcome {
        // SAFETY: the same contract, forwarded.
        unsafe { self.decide_rdpmc(counter) }
    }
}
