//! Serving PMU MSR accesses and RDPMC from the cached context in the shared page.
//!
//! Only called inside a PMI with `PMU_CACHED` set. A page whose bank offsets fail
//! validation gives [`MsrError::PmuUnavailable`]: the access fails like a faulting
//! instruction (the caller's `_safe` variant sees `Err`), rather than touching the real
//! MSR, whose value Xen would overwrite at the flush anyway. A write of a value Xen's
//! flush would refuse ([`verify`](super::verify)) fails like the native `wrmsr` of it,
//! with `#GP`, and leaves the page unchanged. What the cached path serves, and how, is what
//! Xen's PV trap path does with the same access (see `pmu_differential` in the tests):
//! MSRs that path does not give the vPMU pass through, a legacy `IA32_PMCn` write keeps
//! the hardware's sign-extended, width-limited value, `IA32_PERF_GLOBAL_OVF_CTRL` reads
//! as 0, and an `IA32_PERFEVTSELn` write of an event Xen's `IPC_ONLY`/`ARCH_ONLY` filter
//! withholds is `#GP`.

use xenmsr_asm::{MsrError, Outcome, VECTOR_GP};
use xenmsr_hypercall::abi::XenPmuFeature;

use super::classify::{AmdMsr, IntelMsr, PmcIndex, PmuMsr};
use super::layout::{IntelLayout, PmuLayout};
use super::page::{AmdCtxt, BadPage, IntelCtxt, SharedPage, intel_field};
use super::verify;

/// A write Xen's flush would refuse: what the native `wrmsr` of the value raises.
const REFUSED: Outcome = Outcome::Failed(MsrError::Fault { vector: VECTOR_GP });

/// A read or a write.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Access {
    Read,
    Write(u64),
}

/// Where a classified MSR lives in the cached context.
enum Slot {
    /// A page offset.
    At(usize),
    /// A fixed field of the Intel context (offset within the context).
    Field(usize),
    /// `GLOBAL_OVF_CTRL`: its own field, and a write also clears status bits.
    OvfCtrl,
    /// A PMU MSR without a slot: pass through.
    None,
}

fn failed(_: BadPage) -> Outcome {
    Outcome::Failed(MsrError::PmuUnavailable)
}

/// Emulates `access` to the classified `msr` from the cached context of `page`, for a
/// vPMU with Xen's `features`.
///
/// An Intel MSR that Xen's PV trap path does not hand to its vPMU
/// ([`IntelMsr::routed_by_xen_pv`]) is passed through whatever the page holds: trapping,
/// it gets Xen's answer (`#GP`, or whatever the domain's `msr_relaxed` option makes of
/// it), the same inside a PMI as outside.
pub(crate) fn access(
    page: SharedPage,
    layout: &PmuLayout,
    features: XenPmuFeature,
    msr: PmuMsr,
    access: Access,
) -> Outcome {
    if let PmuMsr::Intel(m) = msr
        && !m.routed_by_xen_pv()
    {
        return Outcome::Native;
    }
    cached_access(page, layout, features, msr, access)
}

/// [`access`] without the routing rule: RDPMC reads the counter itself, which the page
/// holds whichever MSR names it.
fn cached_access(
    page: SharedPage,
    layout: &PmuLayout,
    features: XenPmuFeature,
    msr: PmuMsr,
    access: Access,
) -> Outcome {
    match (layout, msr) {
        (PmuLayout::Intel(l), PmuMsr::Intel(m)) => {
            match IntelCtxt::load(page, l.fixed_counters.into(), l.arch_counters.into()) {
                Ok(ctxt) => intel(ctxt, l, features, m, access).unwrap_or_else(failed),
                Err(e) => failed(e),
            }
        }
        (PmuLayout::Amd(l), PmuMsr::Amd(m)) => {
            let len = usize::try_from(l.num_counters).unwrap_or(usize::MAX);
            match AmdCtxt::load(page, len) {
                Ok(ctxt) => amd(ctxt, m, access).unwrap_or_else(failed),
                Err(e) => failed(e),
            }
        }
        // A classification from another layout: not ours to serve.
        _ => Outcome::Native,
    }
}

fn intel(
    ctxt: IntelCtxt,
    layout: &IntelLayout,
    features: XenPmuFeature,
    msr: IntelMsr,
    access: Access,
) -> Result<Outcome, BadPage> {
    if let Access::Write(value) = access
        && !verify::intel_write_ok(layout, features, msr, value)
    {
        return Ok(REFUSED);
    }
    // A legacy counter write stores what the hardware would keep.
    let access = match (msr, access) {
        (IntelMsr::ArchCounter(_), Access::Write(value)) => {
            Access::Write(verify::legacy_counter_value(layout, value))
        }
        _ => access,
    };
    let field = Slot::Field;
    let slot = match msr {
        IntelMsr::GlobalOvfCtrl => Slot::OvfCtrl,
        IntelMsr::GlobalStatus => field(intel_field::GLOBAL_STATUS),
        IntelMsr::GlobalCtrl => field(intel_field::GLOBAL_CTRL),
        IntelMsr::FixedCtrl => field(intel_field::FIXED_CTRL),
        IntelMsr::DsArea => field(intel_field::DS_AREA),
        IntelMsr::PebsEnable => field(intel_field::PEBS_ENABLE),
        IntelMsr::FixedCounter(i) => Slot::At(ctxt.fixed_counter(i.into())?),
        IntelMsr::ArchCounter(i) => Slot::At(ctxt.arch_counter(i.into())?),
        IntelMsr::ArchCounterFullWidth(_) => Slot::None,
        IntelMsr::ArchCtrl(i) => Slot::At(ctxt.arch_control(i.into())?),
    };
    match slot {
        Slot::OvfCtrl => match access {
            // Xen's trap path reads it as 0 (the bits clear status; they hold nothing).
            Access::Read => Ok(Outcome::Done(0)),
            Access::Write(value) => {
                ctxt.write_field(intel_field::GLOBAL_OVF_CTRL, value)?;
                let status = ctxt.read_field(intel_field::GLOBAL_STATUS)?;
                ctxt.write_field(intel_field::GLOBAL_STATUS, status & !value)?;
                Ok(Outcome::Done(0))
            }
        },
        Slot::Field(f) => match access {
            Access::Read => ctxt.read_field(f).map(Outcome::Done),
            Access::Write(value) => ctxt.write_field(f, value).map(|()| Outcome::Done(0)),
        },
        Slot::At(off) => rw(ctxt.page(), off, access),
        Slot::None => Ok(Outcome::Native),
    }
}

fn amd(ctxt: AmdCtxt, msr: AmdMsr, access: Access) -> Result<Outcome, BadPage> {
    let slot = match msr {
        AmdMsr::Ctrl(i) => Slot::At(ctxt.ctrl(i.into())?),
        AmdMsr::Counter(i) => Slot::At(ctxt.counter(i.into())?),
        AmdMsr::NoSlot => Slot::None,
    };
    if let (AmdMsr::Ctrl(_), Slot::At(off), Access::Write(value)) = (msr, &slot, access) {
        let cached = ctxt.page().read::<u64>(*off).ok_or(BadPage::BankOffset)?;
        if !verify::amd_ctrl_write_ok(cached, value) {
            return Ok(REFUSED);
        }
    }
    match slot {
        Slot::At(off) => rw(ctxt.page(), off, access),
        Slot::Field(_) | Slot::OvfCtrl | Slot::None => Ok(Outcome::Native),
    }
}

/// Reads or writes the `u64` at page offset `off`.
fn rw(page: SharedPage, off: usize, access: Access) -> Result<Outcome, BadPage> {
    match access {
        Access::Read => page.read::<u64>(off).map(Outcome::Done),
        Access::Write(value) => page.write::<u64>(off, value).map(|()| Outcome::Done(0)),
    }
    .ok_or(BadPage::BankOffset)
}

/// Repairs the cached context in `page` so that Xen's flush accepts it (see
/// [`verify`]); returns how many registers changed. Banks whose offsets fail validation
/// are left alone (the flush then decides).
pub(crate) fn sanitize(page: SharedPage, layout: &PmuLayout) -> u32 {
    match layout {
        PmuLayout::Intel(l) => {
            IntelCtxt::load(page, l.fixed_counters.into(), l.arch_counters.into())
                .map_or(0, |ctxt| verify::sanitize_intel(ctxt, l))
        }
        PmuLayout::Amd(l) => {
            let len = usize::try_from(l.num_counters).unwrap_or(usize::MAX);
            AmdCtxt::load(page, len).map_or(0, |ctxt| verify::sanitize_amd(ctxt, len))
        }
        PmuLayout::None => 0,
    }
}

/// RDPMC of the decoded counter `pmc` from the cached context of `page`.
pub(crate) fn rdpmc(page: SharedPage, layout: &PmuLayout, pmc: PmcIndex) -> Outcome {
    let msr = match (layout, pmc) {
        (PmuLayout::Intel(_), PmcIndex::IntelFixed(i)) => PmuMsr::Intel(IntelMsr::FixedCounter(i)),
        (PmuLayout::Intel(_), PmcIndex::IntelArch(i)) => PmuMsr::Intel(IntelMsr::ArchCounter(i)),
        (PmuLayout::Amd(_), PmcIndex::Amd(i)) => PmuMsr::Amd(AmdMsr::Counter(i)),
        _ => return Outcome::Failed(MsrError::InvalidCounter),
    };
    // A read: no check depends on the features.
    cached_access(page, layout, XenPmuFeature::empty(), msr, Access::Read)
}
