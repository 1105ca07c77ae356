//! Typed wrappers for the hypercalls `xenmsr` and its test kernel make.
//!
//! Every wrapper goes through [`HypercallPage::call`], the one path into a page, so the
//! real page and the mock page see the same registers. Unused argument registers are 0.
//!
//! # Which wrappers are `unsafe`
//!
//! A wrapper is safe when nothing the caller can pass makes Xen touch memory the caller
//! does not own through the arguments, or change state Rust code relies on:
//!
//! - [`set_segment_base`](HypercallPage::set_segment_base) is `unsafe`: it changes the FS
//!   or GS base, as the `wrmsr` or `wrfsbase` it replaces does, and with it what every
//!   `%fs:`/`%gs:` access reaches (thread-local storage, per-CPU data). Only the caller
//!   knows whether code relies on the old base.
//! - [`xen_version`](HypercallPage::xen_version) passes no pointer and only queries.
//! - [`console_write`](HypercallPage::console_write),
//!   [`sched_shutdown`](HypercallPage::sched_shutdown),
//!   [`sched_yield`](HypercallPage::sched_yield),
//!   [`physdev_set_iopl`](HypercallPage::physdev_set_iopl) and
//!   [`evtchn_send`](HypercallPage::evtchn_send) pass only borrowed, correctly typed
//!   buffers that Xen reads during the call. (A shutdown may not return; that is not
//!   unsafe. IOPL only matters to `in`/`out` instructions, which are `unsafe` asm anyway.)
//! - [`xenpmu_op`](HypercallPage::xenpmu_op) is `unsafe`: `XENPMU_INIT` hands Xen a
//!   machine frame that Xen then writes at every PMU interrupt and reads on flush, outside
//!   any Rust borrow.
//! - [`set_trap_table`](HypercallPage::set_trap_table) is `unsafe`: it installs code
//!   addresses Xen will jump to.
//! - [`multicall`](HypercallPage::multicall) is `unsafe`: it makes arbitrary hypercalls.

use core::ptr;

use crate::abi::{
    EvtchnSend, MulticallEntry, PhysdevSetIopl, SchedShutdown, SegmentBase, ShutdownReason,
    TrapInfo, XenPmuOp, XenPmuParams,
};
use crate::{Errno, HypercallPage, nr};

impl HypercallPage {
    /// `set_segment_base(which, base)`: sets the FS base, the user or kernel GS base, or
    /// (with [`SegmentBase::GS_USER_SEL`]) loads the user GS selector from `base[15:0]`.
    ///
    /// Xen answers `-EINVAL` for a non-canonical base or an unknown `which`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use xenmsr_hypercall::abi::SegmentBase;
    /// use xenmsr_hypercall::{Errno, HypercallPage};
    ///
    /// /// Points FS at a new thread's TLS block during a task switch.
    /// ///
    /// /// # Safety
    /// ///
    /// /// `base` is the incoming task's TLS block, and no code of the outgoing task runs
    /// /// on this CPU before the switch completes.
    /// unsafe fn set_tls(page: HypercallPage, base: u64) -> Result<(), Errno> {
    ///     // SAFETY: forwarded to the caller.
    ///     unsafe { page.set_segment_base(SegmentBase::FS, base) }
    /// }
    /// ```
    ///
    /// # Safety
    ///
    /// Every `%fs:` (or `%gs:`) access after the call reaches memory through the new base.
    /// The caller must make sure that no code running on this vCPU relies on the old one,
    /// for example that the kernel's per-CPU pointer or the running task's thread-local
    /// storage is not behind the base it changes: the same contract as the `wrmsr` of
    /// the base MSR this call replaces.
    pub unsafe fn set_segment_base(self, which: SegmentBase, base: u64) -> Result<(), Errno> {
        // SAFETY: no pointer is passed; what the new base means for memory accesses is the
        // caller's contract (see above).
        unsafe { self.call(nr::SET_SEGMENT_BASE, [u64::from(which.0), base, 0, 0, 0]) }.map(drop)
    }

    /// `xenpmu_op(op, params)`: the virtual PMU interface. `None` passes a NULL pointer,
    /// as `LVTPC_SET` and `FLUSH` expect; Xen copies `params` in and (for the get ops)
    /// back out. Returns Xen's non-negative result.
    ///
    /// # Safety
    ///
    /// For [`XenPmuOp::INIT`], `params.val` must be the MFN of a page the caller owns and
    /// gives to Xen as the vCPU's shared PMU page: Xen writes it at every PMU interrupt and
    /// reads it on `FLUSH`/`LVTPC_SET` until `FINISH`, so it must stay allocated, must not
    /// be used as anything but a [`XenPmuData`](crate::abi::XenPmuData) page, and must not
    /// be freed before a successful `FINISH` for that vCPU. `LVTPC_SET` and `FLUSH` act on
    /// that registered page: the caller must not hold Rust references to the parts of it
    /// Xen writes across these calls. The other ops touch only `params`.
    pub unsafe fn xenpmu_op(
        self,
        op: XenPmuOp,
        params: Option<&mut XenPmuParams>,
    ) -> Result<u64, Errno> {
        let arg = match params {
            Some(params) => ptr::from_mut(params) as u64,
            None => 0,
        };
        // SAFETY: `arg` is NULL or a live, exclusively borrowed `XenPmuParams` that Xen
        // may read and write during the call; the shared page is the caller's contract.
        unsafe { self.call(nr::XENPMU_OP, [u64::from(op.0), arg, 0, 0, 0]) }
    }

    /// `console_io(CONSOLEIO_write, len, bytes)`: writes to the hypervisor console (dom0;
    /// an unprivileged domain usually gets `-EPERM`). Returns Xen's non-negative result.
    pub fn console_write(self, bytes: &[u8]) -> Result<u64, Errno> {
        let len = bytes.len() as u64;
        let buf = bytes.as_ptr() as u64;
        // SAFETY: Xen reads at most `len` bytes from `buf` during the call, all of which
        // are borrowed for it. (Xen takes the count as 32 bits; a truncated count is still
        // within the buffer.)
        unsafe {
            self.call(
                nr::CONSOLE_IO,
                [u64::from(nr::CONSOLEIO_WRITE), len, buf, 0, 0],
            )
        }
    }

    /// `sched_op(SCHEDOP_shutdown, &{reason})`: shuts the domain down. Returns only for a
    /// suspend (when the domain resumes), on error, or on the mock page.
    pub fn sched_shutdown(self, reason: ShutdownReason) -> Result<(), Errno> {
        let arg = SchedShutdown { reason: reason.0 };
        // SAFETY: Xen reads the `SchedShutdown` on this stack frame during the call; ending
        // the domain is not a memory-safety concern.
        unsafe {
            self.call(
                nr::SCHED_OP,
                [
                    u64::from(nr::SCHEDOP_SHUTDOWN),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `sched_op(SCHEDOP_shutdown, &{SHUTDOWN_suspend})` with the machine frame of the
    /// domain's `start_info` page in the third argument (`rdx`), which the toolstack reads
    /// from vCPU 0's saved registers and rewrites for the new domain: the PV suspend.
    /// Returns `Ok(0)` when the domain runs on in a new domain (restored or migrated),
    /// `Ok(1)` when the toolstack cancelled it (the same domain runs on), `Err` when Xen
    /// refused.
    ///
    /// # Safety
    ///
    /// Only a domU may call it, on vCPU 0, with every other vCPU parked and this vCPU's
    /// upcalls masked, and the guest's pre-suspend steps done (`start_info`'s store and
    /// console frames turned into PFNs, the shared-info frame unmapped): across the call
    /// every machine frame of the domain may change, and memory the toolstack owns
    /// (`start_info`, the p2m list, the xenstore and console rings) is rewritten under the
    /// caller. Made by dom0 it halts or reboots the host.
    ///
    /// Safe code cannot suspend:
    ///
    /// ```compile_fail,E0133
    /// fn suspend(page: xenmsr_hypercall::HypercallPage) {
    ///     let _ = page.sched_suspend(0);
    /// }
    /// ```
    pub unsafe fn sched_suspend(self, start_info_mfn: u64) -> Result<u64, Errno> {
        let arg = SchedShutdown {
            reason: nr::SHUTDOWN_SUSPEND,
        };
        // SAFETY: Xen reads the `SchedShutdown` on this stack frame during the call; the
        // caller guarantees the rest (its contract above).
        unsafe {
            self.call(
                nr::SCHED_OP,
                [
                    u64::from(nr::SCHEDOP_SHUTDOWN),
                    ptr::from_ref(&arg) as u64,
                    start_info_mfn,
                    0,
                    0,
                ],
            )
        }
    }

    /// `xen_version(XENVER_version, NULL)`: the running hypervisor's version as
    /// `(major, minor)`, which Xen returns as `major << 16 | minor` (4.20 is `0x0004_0014`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use xenmsr_hypercall::{Errno, HypercallPage};
    ///
    /// fn at_least_4_17(page: HypercallPage) -> Result<bool, Errno> {
    ///     Ok(page.xen_version()? >= (4, 17))
    /// }
    /// ```
    pub fn xen_version(self) -> Result<(u16, u16), Errno> {
        // SAFETY: no pointer is passed; the query changes nothing.
        let v = unsafe { self.call(nr::XEN_VERSION, [u64::from(nr::XENVER_VERSION), 0, 0, 0, 0]) }?;
        // The result is 32 bits: the major version in the high half, the minor in the low.
        Ok(((v >> 16) as u16, v as u16))
    }

    /// `sched_op(SCHEDOP_yield, NULL)`: gives up the CPU.
    pub fn sched_yield(self) -> Result<(), Errno> {
        // SAFETY: no pointer is passed; yielding has no effect on memory.
        unsafe { self.call(nr::SCHED_OP, [u64::from(nr::SCHEDOP_YIELD), 0, 0, 0, 0]) }.map(drop)
    }

    /// `set_trap_table(table)`: installs the entries of `table` in the virtual IDT.
    ///
    /// The table must end with an entry whose `address` is 0 (for instance
    /// [`TrapInfo::TERMINATOR`]); Xen reads up to the first such entry. Without one this
    /// returns `Err(EINVAL)` and makes no call.
    ///
    /// # Safety
    ///
    /// Every non-zero `address` before the terminator must be the entry point of a handler
    /// that copes with Xen's exception bounce frame (`rcx`, `r11` and the error code on
    /// top of a hardware-like frame) for that vector, and must stay valid for as long as it
    /// is installed. Xen copies the table during the call.
    pub unsafe fn set_trap_table(self, table: &[TrapInfo]) -> Result<(), Errno> {
        match table.last() {
            Some(last) if last.address == 0 => {}
            _ => return Err(Errno::EINVAL),
        }
        // SAFETY: the table is borrowed for the call and terminated, so Xen reads only
        // within it; the handlers are the caller's contract.
        unsafe { self.call(nr::SET_TRAP_TABLE, [table.as_ptr() as u64, 0, 0, 0, 0]) }.map(drop)
    }

    /// `physdev_op(PHYSDEVOP_set_iopl, &{iopl})`: sets the kernel's I/O privilege level,
    /// which decides whether `in`/`out` from the kernel trap.
    pub fn physdev_set_iopl(self, iopl: u32) -> Result<(), Errno> {
        let arg = PhysdevSetIopl { iopl };
        // SAFETY: Xen reads the `PhysdevSetIopl` on this stack frame during the call.
        unsafe {
            self.call(
                nr::PHYSDEV_OP,
                [
                    u64::from(nr::PHYSDEVOP_SET_IOPL),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `event_channel_op(EVTCHNOP_send, &{port})`: notifies the remote end of `port`.
    pub fn evtchn_send(self, port: u32) -> Result<(), Errno> {
        let arg = EvtchnSend { port };
        // SAFETY: Xen reads the `EvtchnSend` on this stack frame during the call.
        unsafe {
            self.call(
                nr::EVENT_CHANNEL_OP,
                [
                    u64::from(nr::EVTCHNOP_SEND),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `multicall(calls, n)`: makes every call of the batch in order; Xen stores each raw
    /// result in its entry's `result`. The returned `Result` is the batch's own (e.g.
    /// `-EFAULT` if the array cannot be read), not the entries'. More than `u32::MAX`
    /// entries give `Err(EINVAL)` without a call.
    ///
    /// # Safety
    ///
    /// Each entry must be a hypercall the caller could make with
    /// [`call_raw`](Self::call_raw) under that function's contract: pointer arguments
    /// valid for what the hypercall does with them, and its side effects ones the caller
    /// can uphold Rust's rules under.
    pub unsafe fn multicall(self, calls: &mut [MulticallEntry]) -> Result<(), Errno> {
        let Ok(n) = u32::try_from(calls.len()) else {
            return Err(Errno::EINVAL);
        };
        // SAFETY: the array is exclusively borrowed for the call (Xen writes `result`);
        // each entry's own contract is the caller's.
        unsafe {
            self.call(
                nr::MULTICALL,
                [calls.as_mut_ptr() as u64, u64::from(n), 0, 0, 0],
            )
        }
        .map(drop)
    }
}
