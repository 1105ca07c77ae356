//! Shared helpers for the vPMU tests: a shared page between `PROT_NONE` guard pages, a
//! scripted "Xen" on the mock hypercall page, and a fake native MSR reader.
#![allow(dead_code)]

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::Mutex;

use xenmsr::pmu::{
    DEFAULT_VCPUS, IntelLayout, NativeMsr, PAGE_SIZE, PmuLayout, VcpuSlot, Vpmu, VpmuConfig,
};
use xenmsr_asm::MsrError;
use xenmsr_hypercall::abi::{
    PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, PmuFlags, XenPmuFeature, XenPmuParams,
};
use xenmsr_hypercall::{HypercallPage, mock, nr};

/// `__HYPERVISOR_xenpmu_op`.
pub const XENPMU_OP: u32 = 40;

/// One read-write page with an inaccessible page on each side, so that any access
/// outside it faults (SIGSEGV) instead of silently touching other memory.
#[derive(Debug)]
pub struct GuardedPage {
    map: *mut u8,
}

// SAFETY: the mapping is plain memory owned by this value; tests share it across the
// closures of one thread only, but nothing here is thread-affine.
unsafe impl Send for GuardedPage {}

impl GuardedPage {
    /// Maps three pages, makes the middle one read-write, fills it with `0xa5`.
    pub fn new() -> Self {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE_SIZE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(
            map,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let map = map.cast::<u8>();
        // SAFETY: the middle page of the mapping just created.
        let rc = unsafe {
            libc::mprotect(
                map.wrapping_add(PAGE_SIZE).cast(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_eq!(rc, 0, "mprotect: {}", std::io::Error::last_os_error());
        let page = GuardedPage { map };
        page.fill(0xa5);
        page
    }

    /// The usable page.
    pub fn ptr(&self) -> NonNull<u8> {
        NonNull::new(self.map.wrapping_add(PAGE_SIZE)).expect("inside a successful mapping")
    }

    /// The page's address as an integer (for `'static` mock handlers).
    pub fn addr(&self) -> usize {
        self.ptr().as_ptr() as usize
    }

    /// Fills the page with `byte`.
    pub fn fill(&self, byte: u8) {
        // SAFETY: the page is read-write and PAGE_SIZE long.
        unsafe { self.ptr().as_ptr().write_bytes(byte, PAGE_SIZE) };
    }

    /// A copy of the page.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0; PAGE_SIZE];
        // SAFETY: the page is readable and PAGE_SIZE long; `v` is a distinct allocation.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().as_ptr(), v.as_mut_ptr(), PAGE_SIZE) };
        v
    }

    /// Overwrites the page.
    pub fn load(&self, bytes: &[u8]) {
        assert_eq!(bytes.len(), PAGE_SIZE);
        // SAFETY: as in `snapshot`, the other way round.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr().as_ptr(), PAGE_SIZE) };
    }

    pub fn w64(&self, off: usize, v: u64) {
        w64(self.addr(), off, v)
    }
    pub fn r64(&self, off: usize) -> u64 {
        r64(self.addr(), off)
    }
    pub fn w32(&self, off: usize, v: u32) {
        w32(self.addr(), off, v)
    }
    pub fn r32(&self, off: usize) -> u32 {
        r32(self.addr(), off)
    }
}

impl Drop for GuardedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.map.cast(), 3 * PAGE_SIZE) };
    }
}

/// Writes a `u64` at `off` of the page at `addr`.
pub fn w64(addr: usize, off: usize, v: u64) {
    assert!(off + 8 <= PAGE_SIZE);
    // SAFETY: in bounds of a live read-write test page.
    unsafe { ((addr + off) as *mut u64).write_unaligned(v) }
}
/// Reads a `u64` at `off` of the page at `addr`.
pub fn r64(addr: usize, off: usize) -> u64 {
    assert!(off + 8 <= PAGE_SIZE);
    // SAFETY: in bounds of a live test page.
    unsafe { ((addr + off) as *const u64).read_unaligned() }
}
/// Writes a `u32`.
pub fn w32(addr: usize, off: usize, v: u32) {
    assert!(off + 4 <= PAGE_SIZE);
    // SAFETY: in bounds of a live read-write test page.
    unsafe { ((addr + off) as *mut u32).write_unaligned(v) }
}
/// Reads a `u32`.
pub fn r32(addr: usize, off: usize) -> u32 {
    assert!(off + 4 <= PAGE_SIZE);
    // SAFETY: in bounds of a live test page.
    unsafe { ((addr + off) as *const u32).read_unaligned() }
}

/// Page offsets of the Intel context's fixed fields.
pub mod intel {
    use super::PMU_CTXT_OFFSET as C;
    pub const FIXED_OFF: usize = C;
    pub const ARCH_OFF: usize = C + 4;
    pub const GLOBAL_CTRL: usize = C + 8;
    pub const GLOBAL_OVF_CTRL: usize = C + 16;
    pub const GLOBAL_STATUS: usize = C + 24;
    pub const FIXED_CTRL: usize = C + 32;
    pub const DS_AREA: usize = C + 40;
    pub const PEBS_ENABLE: usize = C + 48;
    pub const DEBUGCTL: usize = C + 56;
}

/// Page offsets of the AMD context's bank offsets.
pub mod amd {
    use super::PMU_CTXT_OFFSET as C;
    pub const COUNTERS_OFF: usize = C;
    pub const CTRLS_OFF: usize = C + 4;
}

/// What Xen writes at a PMI for an Intel vCPU: bank offsets as Xen computes them (fixed
/// bank at 64, arch bank right after), the banks, and `PMU_CACHED | PMU_SAMPLE_PV`.
pub fn xen_intel_pmi(addr: usize, fixed: &[u64], arch: &[(u64, u64)]) {
    let fixed_off = 64u32;
    let arch_off = 64 + 8 * fixed.len() as u32;
    w32(addr, intel::FIXED_OFF, fixed_off);
    w32(addr, intel::ARCH_OFF, arch_off);
    for (i, v) in fixed.iter().enumerate() {
        w64(addr, PMU_CTXT_OFFSET + fixed_off as usize + 8 * i, *v);
    }
    for (i, (counter, control)) in arch.iter().enumerate() {
        let at = PMU_CTXT_OFFSET + arch_off as usize + 16 * i;
        w64(addr, at, *counter);
        w64(addr, at + 8, *control);
    }
    set_flags(addr, PmuFlags::CACHED | PmuFlags::SAMPLE_PV);
}

/// What Xen writes at a PMI for an AMD vCPU: counters at 8, controls after them.
pub fn xen_amd_pmi(addr: usize, counters: &[u64], ctrls: &[u64]) {
    let n = counters.len() as u32;
    w32(addr, amd::COUNTERS_OFF, 8);
    w32(addr, amd::CTRLS_OFF, 8 + 8 * n);
    for (i, v) in counters.iter().enumerate() {
        w64(addr, PMU_CTXT_OFFSET + 8 + 8 * i, *v);
    }
    for (i, v) in ctrls.iter().enumerate() {
        w64(addr, PMU_CTXT_OFFSET + 8 + 8 * n as usize + 8 * i, *v);
    }
    set_flags(addr, PmuFlags::CACHED | PmuFlags::SAMPLE_PV);
}

/// Sets `pmu_flags`.
pub fn set_flags(addr: usize, flags: PmuFlags) {
    w64(addr, PMU_FLAGS_OFFSET, flags.bits());
}

/// Reads `pmu_flags`.
pub fn flags(addr: usize) -> PmuFlags {
    PmuFlags::from_bits_retain(r64(addr, PMU_FLAGS_OFFSET))
}

/// Installs a "Xen" for `xenpmu_op` on this thread: INIT, FINISH, LVTPC_SET succeed;
/// FLUSH clears `PMU_CACHED` in the page at `addr`; FEATURE_GET answers no features
/// (Xen's default, `vpmu=1`); everything else gets `-EINVAL`.
pub fn xen_ok(addr: usize) {
    xen_ok_with_features(addr, XenPmuFeature::empty());
}

/// [`xen_ok`] with a Xen whose `XENPMU_feature_get` answers `features` (its `vpmu=bts`,
/// `vpmu=ipc`, `vpmu=arch` options).
pub fn xen_ok_with_features(addr: usize, features: XenPmuFeature) {
    mock::on(XENPMU_OP, move |args| match args[0] as u32 {
        nr::XENPMU_FLUSH => {
            let f = flags(addr);
            set_flags(addr, f - PmuFlags::CACHED);
            0
        }
        nr::XENPMU_FEATURE_GET => {
            answer_val(args, features.bits());
            0
        }
        nr::XENPMU_INIT | nr::XENPMU_FINISH | nr::XENPMU_LVTPC_SET => 0,
        _ => -22,
    });
}

/// Writes Xen's answer into the caller's `XenPmuParams::val`, as Xen's `MODE_GET` and
/// `FEATURE_GET` do (from a mock handler, during the call).
pub fn answer_val(args: &[u64; 5], val: u64) {
    assert_ne!(args[1], 0, "params pointer is NULL");
    let at = (args[1] as usize + std::mem::offset_of!(XenPmuParams, val)) as *mut u64;
    // SAFETY: during the call, `args[1]` points to the caller's live, exclusive
    // `XenPmuParams`; `at` is its `val` field.
    unsafe { at.write_unaligned(val) }
}

/// The `XenPmuParams` a call passed (read during the call, from a mock handler).
pub fn params_of(args: &[u64; 5]) -> XenPmuParams {
    assert_ne!(args[1], 0, "params pointer is NULL");
    // SAFETY: during the call, `args[1]` points to the caller's live `XenPmuParams`.
    unsafe { (args[1] as *const XenPmuParams).read_unaligned() }
}

/// The ops (`args[0]`) of this thread's recorded `xenpmu_op` calls, asserting that no
/// other hypercall was made.
pub fn pmu_ops() -> Vec<u32> {
    mock::take_calls()
        .into_iter()
        .map(|c| {
            assert_eq!(c.nr, XENPMU_OP, "unexpected hypercall {c:?}");
            c.args[0] as u32
        })
        .collect()
}

/// A native reader that answers `msr * 3 + 1` and records what it read; MSRs in `fail`
/// fault with #GP.
#[derive(Debug, Default)]
pub struct FakeNative {
    pub reads: Mutex<Vec<u32>>,
    pub fail: Vec<u32>,
}

impl FakeNative {
    /// A leaked instance (the `Vpmu` needs `'static`).
    pub fn leak(fail: Vec<u32>) -> &'static FakeNative {
        Box::leak(Box::new(FakeNative {
            reads: Mutex::new(Vec::new()),
            fail,
        }))
    }

    /// The value it answers for `msr`.
    pub fn value(msr: u32) -> u64 {
        u64::from(msr) * 3 + 1
    }

    /// Takes the recorded reads.
    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut self.reads.lock().unwrap())
    }
}

impl NativeMsr for FakeNative {
    unsafe fn read_safe(&self, msr: u32) -> Result<u64, MsrError> {
        self.reads.lock().unwrap().push(msr);
        if self.fail.contains(&msr) {
            Err(MsrError::Fault { vector: 13 })
        } else {
            Ok(Self::value(msr))
        }
    }
}

/// Skylake-like: 4 general counters, 3 fixed.
pub const SKYLAKE: PmuLayout = PmuLayout::Intel(IntelLayout {
    arch_counters: 4,
    fixed_counters: 3,
    version: 4,
    fixed_counter_width: 48,
    arch_counter_width: 48,
});

thread_local! {
    /// The vCPU this test thread plays (the backends' `vcpu_id` hook answers it).
    static VCPU: Cell<u32> = const { Cell::new(0) };
}

/// The `vcpu_id` hook of the test backends: this thread's vCPU.
pub fn current_vcpu() -> u32 {
    VCPU.with(Cell::get)
}

/// Makes this thread run as `vcpu` (what `on_pmi`, `lvtpc_set`, the MSR accesses and
/// RDPMC act on).
pub fn set_vcpu(vcpu: u32) {
    VCPU.with(|v| v.set(vcpu));
}

/// `n` fresh slots that live for the rest of the test process.
pub fn leak_slots(n: usize) -> &'static [VcpuSlot] {
    Box::leak((0..n).map(|_| VcpuSlot::new()).collect())
}

/// A configured backend over the mock page, with [`DEFAULT_VCPUS`] slots of its own and
/// this thread's vCPU as the calling one.
pub fn vpmu(hc: HypercallPage, layout: PmuLayout, native: &'static FakeNative) -> Vpmu {
    vpmu_with_slots(hc, layout, native, leak_slots(DEFAULT_VCPUS))
}

/// [`vpmu`] with the given slot storage.
pub fn vpmu_with_slots(
    hc: HypercallPage,
    layout: PmuLayout,
    native: &'static FakeNative,
    slots: &'static [VcpuSlot],
) -> Vpmu {
    Vpmu::with(VpmuConfig {
        hypercalls: hc,
        layout,
        native,
        vcpu_id: current_vcpu,
        slots,
    })
}

/// Registers `page` for `vcpu` (with "Xen" answering 0), then forgets the INIT call.
pub fn registered(v: &Vpmu, vcpu: u32, page: &GuardedPage) {
    // SAFETY: the guarded page is 4 KiB aligned, read-write, and outlives `v` in every
    // test that uses this helper.
    unsafe { v.init_vcpu(vcpu, page.ptr(), 0x1234) }.expect("init");
    let _ = mock::take_calls();
}

/// Installs a "Xen" whose FLUSH refuses a context with a non-zero `pebs_enable`, as Xen
/// 4.17's `core2_vpmu_verify` does: it answers `-EIO` and leaves `PMU_CACHED` set (Xen
/// sets it again). An accepted flush clears `PMU_CACHED`. Counts the flushes in `flushes`.
pub fn xen_refusing_pebs(addr: usize, flushes: std::rc::Rc<Cell<u32>>) {
    mock::on(XENPMU_OP, move |args| match args[0] as u32 {
        nr::XENPMU_FLUSH => {
            flushes.set(flushes.get() + 1);
            if r64(addr, intel::PEBS_ENABLE) != 0 {
                set_flags(addr, flags(addr) | PmuFlags::CACHED);
                xenmsr_hypercall::Errno::EIO.to_ret()
            } else {
                set_flags(addr, flags(addr) - PmuFlags::CACHED);
                0
            }
        }
        nr::XENPMU_INIT | nr::XENPMU_FINISH | nr::XENPMU_LVTPC_SET => 0,
        _ => -22,
    });
}
