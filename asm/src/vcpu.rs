//! The PV runtime kit's vCPU stacks, and which vCPU is running, told by the stack.
//!
//! # Why the stack
//!
//! A 64-bit PV guest has no instruction that names the running vCPU (no APIC id it can
//! read, no per-vCPU register Xen sets up for it), and the FS and GS bases, where kernels
//! usually keep per-CPU data, are exactly what this library lets the kernel change. The
//! kit therefore gives every vCPU its own [`VcpuStack`], 64 KiB aligned to 64 KiB, and
//! records which vCPU owns which stack when it hands one out. Exceptions and upcalls
//! arrive on the interrupted stack (a PV kernel's kernel mode takes no stack switch), so
//! anywhere in the kernel, upcall handlers included, the running vCPU is the owner of the
//! stack under `rsp`: [`current`] rounds `rsp` down to 64 KiB and looks the base up in
//! the registry. Nothing is read outside the registry (a stack that is not the kit's may
//! sit next to unmapped memory), and an `rsp` on no registered stack answers `None`,
//! never a guess.
//!
//! The boot vCPU's stack is registered as vCPU 0 by the kit's entry
//! ([`pv_entry!`](crate::pv_entry)); `xenmsr::smp::start_vcpu` registers each secondary's
//! before Xen starts it. A kernel that runs on stacks of its own (per-task kernel stacks,
//! say) tells the library its vCPU ids with `Config::with_vcpu_id` instead; the library
//! checks that whatever tells it the id gives every online vCPU a different one.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The most vCPUs the kit's registry tracks (ids `0..MAX_VCPUS`).
pub const MAX_VCPUS: usize = 64;
/// log2 of [`VcpuStack::SIZE`].
pub const STACK_SHIFT: u32 = 16;

/// What [`current_or_unknown`] answers when `rsp` is on no registered stack.
pub const UNKNOWN_VCPU: u32 = u32::MAX;

/// One vCPU's stack: 64 KiB, aligned to its size, for a kernel to declare as a `static`
/// and hand to the kit (`xenmsr::smp::start_vcpu`). A stack is given to at most one vCPU
/// for the life of the kernel: the kit claims it atomically, and a second claim fails.
///
/// ```
/// use xenmsr_asm::vcpu::VcpuStack;
/// static STACKS: [VcpuStack; 3] = [const { VcpuStack::new() }; 3];
/// assert_eq!(core::mem::align_of_val(&STACKS[0]), VcpuStack::SIZE);
/// ```
#[repr(C, align(65536))]
pub struct VcpuStack {
    /// Set once the stack belongs to a vCPU.
    claimed: AtomicBool,
    /// The memory the vCPU runs on (the claim flag's line at the bottom stays out of its
    /// way: a stack grows down from the top).
    memory: UnsafeCell<[u8; Self::SIZE - 64]>,
}

// SAFETY: the memory is only ever used as the stack of the one vCPU that claimed it (the
// claim is an atomic swap); the kit never forms references into it.
unsafe impl Sync for VcpuStack {}

impl core::fmt::Debug for VcpuStack {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VcpuStack")
            .field("base", &self.base())
            .field("claimed", &self.claimed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for VcpuStack {
    fn default() -> Self {
        Self::new()
    }
}

const _: () = assert!(core::mem::size_of::<VcpuStack>() == VcpuStack::SIZE);
const _: () = assert!(core::mem::align_of::<VcpuStack>() == VcpuStack::SIZE);

impl VcpuStack {
    /// Size (and alignment) of a stack: 64 KiB.
    pub const SIZE: usize = 1 << STACK_SHIFT;

    /// An unclaimed stack.
    pub const fn new() -> Self {
        Self {
            claimed: AtomicBool::new(false),
            memory: UnsafeCell::new([0; Self::SIZE - 64]),
        }
    }

    /// The lowest address of the stack (its registry key).
    pub fn base(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    /// One past the highest address: where `rsp` starts.
    pub fn top(&self) -> usize {
        self.base() + Self::SIZE
    }

    /// Whether a vCPU owns the stack.
    pub fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::Acquire)
    }
}

/// Why a stack could not be registered for a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackError {
    /// The id is at or above [`MAX_VCPUS`].
    IdOutOfRange(u32),
    /// The id already has a stack.
    IdTaken(u32),
    /// The stack already belongs to a vCPU.
    StackTaken,
}

impl core::fmt::Display for StackError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StackError::IdOutOfRange(id) => {
                write!(f, "vCPU id {id} is beyond the kit's {MAX_VCPUS} vCPUs")
            }
            StackError::IdTaken(id) => write!(f, "vCPU {id} already has a stack"),
            StackError::StackTaken => write!(f, "the stack already belongs to a vCPU"),
        }
    }
}

/// Each vCPU's stack base (0: none).
static BASES: [AtomicUsize; MAX_VCPUS] = [const { AtomicUsize::new(0) }; MAX_VCPUS];
/// One more than the highest id registered so far: where [`current`]'s scan stops.
static SCAN_END: AtomicUsize = AtomicUsize::new(0);

/// Gives `stack` to vCPU `id`: claims the stack, then the id. On an error nothing is
/// registered (a stack whose id was taken stays unclaimed). The kit's entry and
/// `xenmsr::smp::start_vcpu` call it; a kernel has no need to.
///
/// # Safety
///
/// Only vCPU `id` ever runs on `stack`: the registry is what names the running vCPU, and
/// the library keeps per-vCPU state (the vPMU's page) that two vCPUs with one id would
/// both use.
///
/// ```
/// use xenmsr_asm::vcpu::{VcpuStack, register};
/// static STACK: VcpuStack = VcpuStack::new();
/// // SAFETY: nothing runs on STACK in this example, so no other vCPU can.
/// assert_eq!(unsafe { register(5, &STACK) }, Ok(()));
/// ```
///
/// Safe code cannot name a vCPU's stack:
///
/// ```compile_fail,E0133
/// use xenmsr_asm::vcpu::{VcpuStack, register};
/// static STACK: VcpuStack = VcpuStack::new();
/// let _ = register(5, &STACK);
/// ```
pub unsafe fn register(id: u32, stack: &'static VcpuStack) -> Result<(), StackError> {
    let index = id as usize;
    if index >= MAX_VCPUS {
        return Err(StackError::IdOutOfRange(id));
    }
    if stack.claimed.swap(true, Ordering::AcqRel) {
        return Err(StackError::StackTaken);
    }
    if BASES[index]
        .compare_exchange(0, stack.base(), Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        stack.claimed.store(false, Ordering::Release);
        return Err(StackError::IdTaken(id));
    }
    SCAN_END.fetch_max(index + 1, Ordering::AcqRel);
    Ok(())
}

/// The stack registered for vCPU `id`, as its base address.
pub fn stack_base(id: u32) -> Option<usize> {
    let base = BASES.get(id as usize)?.load(Ordering::Acquire);
    (base != 0).then_some(base)
}

/// The vCPU whose registered stack holds `sp` (see the module docs).
pub fn owner_of(sp: usize) -> Option<u32> {
    let base = sp & !(VcpuStack::SIZE - 1);
    let end = SCAN_END.load(Ordering::Acquire).min(MAX_VCPUS);
    (0..end)
        .find(|&i| BASES[i].load(Ordering::Relaxed) == base)
        .map(|i| i as u32)
}

/// The running vCPU, if it runs on a stack the kit registered.
#[inline]
pub fn current() -> Option<u32> {
    owner_of(stack_pointer())
}

/// [`current`], or [`UNKNOWN_VCPU`]: the library's default vCPU-id hook (a plain `fn`).
pub fn current_or_unknown() -> u32 {
    current().unwrap_or(UNKNOWN_VCPU)
}

#[inline(always)]
fn stack_pointer() -> usize {
    let sp: usize;
    // SAFETY: copies rsp into a register; no memory, stack or flags are touched.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags))
    };
    sp
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::boxed::Box;

    use super::*;

    fn leaked() -> &'static VcpuStack {
        Box::leak(Box::new(VcpuStack::new()))
    }

    // The registry is global: one test walks every case in order.
    #[test]
    fn registry_claims_each_stack_and_id_once_and_finds_owners() {
        let a = leaked();
        let b = leaked();
        assert_eq!(a.base() % VcpuStack::SIZE, 0);
        let register = |id, stack| {
            // SAFETY: nothing runs on these heap stacks.
            unsafe { register(id, stack) }
        };
        assert_eq!(
            register(MAX_VCPUS as u32, a),
            Err(StackError::IdOutOfRange(64))
        );
        assert!(!a.is_claimed(), "a refused id leaves the stack free");
        assert_eq!(register(40, a), Ok(()));
        assert_eq!(register(41, a), Err(StackError::StackTaken));
        assert_eq!(register(40, b), Err(StackError::IdTaken(40)));
        assert!(!b.is_claimed(), "a refused id leaves the stack free");
        assert_eq!(register(41, b), Ok(()));
        assert_eq!(stack_base(40), Some(a.base()));
        assert_eq!(owner_of(a.top() - 8), Some(40));
        assert_eq!(owner_of(a.base()), Some(40));
        assert_eq!(owner_of(b.top() - 1), Some(41));
        assert_eq!(
            owner_of(a.top()),
            owner_of(b.base()).filter(|_| a.top() == b.base())
        );
        // The test thread's own stack is not a registered one.
        assert_eq!(current(), None);
        assert_eq!(current_or_unknown(), UNKNOWN_VCPU);
    }
}
