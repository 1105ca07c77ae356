//! Typed wrappers for what an SMP PV kernel needs besides MSRs: starting vCPUs, event
//! channels and upcalls, the per-vCPU timer, mapping the shared info page, run-state
//! accounting and the Xen version.
//!
//! # Which wrappers are `unsafe`
//!
//! - [`vcpu_initialise`](HypercallPage::vcpu_initialise) and
//!   [`vcpu_up`](HypercallPage::vcpu_up): a vCPU starts running code at an address, on a
//!   stack and with page tables of the caller's choosing.
//! - [`callback_register`](HypercallPage::callback_register): installs a code address Xen
//!   will jump to.
//! - [`update_va_mapping`](HypercallPage::update_va_mapping): changes what a virtual
//!   address maps.
//! - The others pass only borrowed, correctly typed arguments that Xen reads or writes
//!   during the call, and change no memory Rust code relies on: binding or unmasking a
//!   port, polling ports, arming or stopping a timer, asking whether a vCPU is up,
//!   reading run-state times and the version.

use core::ptr;

use crate::abi::{
    CallbackRegister, CallbackType, EvtchnBindVirq, EvtchnUnmask, SchedPoll, VcpuGuestContext,
    VcpuRunstateInfo, VcpuSetSingleshotTimer,
};
use crate::{Errno, HypercallPage, nr};

impl HypercallPage {
    /// `vcpu_op(VCPUOP_initialise, vcpu, ctx)`: sets the context a down vCPU starts with
    /// (Xen copies it during the call). `-EEXIST` if the vCPU was initialised already,
    /// `-ENOENT` if it does not exist, `-EINVAL` for a context Xen rejects.
    ///
    /// # Safety
    ///
    /// Once [`vcpu_up`](Self::vcpu_up) starts the vCPU it runs `ctx.user_regs.rip` on
    /// `ctx.user_regs.rsp` with the page tables of `ctx.ctrlreg[3]`, the trap table
    /// `ctx.trap_ctxt` and the callbacks in `ctx`: each must be code and memory of this
    /// kernel fit for that (the entry point must not return, the stack must be this vCPU's
    /// alone, the handlers must follow Xen's bounce-frame contract).
    pub unsafe fn vcpu_initialise(self, vcpu: u32, ctx: &VcpuGuestContext) -> Result<(), Errno> {
        // SAFETY: Xen only reads the context during the call; what the vCPU later runs is
        // the caller's contract.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [
                    u64::from(nr::VCPUOP_INITIALISE),
                    u64::from(vcpu),
                    ptr::from_ref(ctx) as u64,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `vcpu_op(VCPUOP_up, vcpu, NULL)`: starts an initialised vCPU (`-EINVAL` if it was
    /// never initialised).
    ///
    /// # Safety
    ///
    /// The vCPU's context (from [`vcpu_initialise`](Self::vcpu_initialise), or where it
    /// was stopped) must still be fit to run, as that function requires.
    pub unsafe fn vcpu_up(self, vcpu: u32) -> Result<(), Errno> {
        // SAFETY: no pointer is passed; what the vCPU runs is the caller's contract.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [u64::from(nr::VCPUOP_UP), u64::from(vcpu), 0, 0, 0],
            )
        }
        .map(drop)
    }

    /// `vcpu_op(VCPUOP_down, vcpu, NULL)`: stops a vCPU (the calling one, or another);
    /// its context is kept, and [`vcpu_up`](Self::vcpu_up) resumes it where it stopped
    /// (for the calling vCPU: on return from this hypercall).
    ///
    /// # Safety
    ///
    /// Whatever the stopped vCPU holds (a lock, a half-done update, a job others wait for)
    /// stays held until it is brought up again: the kernel must know it holds nothing
    /// that others need meanwhile.
    pub unsafe fn vcpu_down(self, vcpu: u32) -> Result<(), Errno> {
        // SAFETY: no pointer is passed; what the stopped vCPU holds is the caller's
        // contract.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [u64::from(nr::VCPUOP_DOWN), u64::from(vcpu), 0, 0, 0],
            )
        }
        .map(drop)
    }

    /// `vcpu_op(VCPUOP_is_up, vcpu, NULL)`: whether the vCPU is running (`-ENOENT` if the
    /// domain has no such vCPU).
    pub fn vcpu_is_up(self, vcpu: u32) -> Result<bool, Errno> {
        // SAFETY: no pointer is passed and nothing changes.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [u64::from(nr::VCPUOP_IS_UP), u64::from(vcpu), 0, 0, 0],
            )
        }
        .map(|up| up != 0)
    }

    /// `vcpu_op(VCPUOP_get_runstate_info, vcpu, &info)`: how long the vCPU has spent
    /// running, runnable, blocked and offline.
    pub fn vcpu_runstate_info(self, vcpu: u32) -> Result<VcpuRunstateInfo, Errno> {
        let mut info = VcpuRunstateInfo::default();
        // SAFETY: Xen writes the `VcpuRunstateInfo` on this stack frame during the call.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [
                    u64::from(nr::VCPUOP_GET_RUNSTATE_INFO),
                    u64::from(vcpu),
                    ptr::from_mut(&mut info) as u64,
                    0,
                    0,
                ],
            )
        }?;
        Ok(info)
    }

    /// `vcpu_op(VCPUOP_stop_periodic_timer, vcpu, NULL)`: stops the vCPU's periodic
    /// `VIRQ_TIMER` (a PV vCPU starts with a 100 Hz tick).
    pub fn vcpu_stop_periodic_timer(self, vcpu: u32) -> Result<(), Errno> {
        // SAFETY: no pointer is passed; only Xen's timer state changes.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [
                    u64::from(nr::VCPUOP_STOP_PERIODIC_TIMER),
                    u64::from(vcpu),
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `vcpu_op(VCPUOP_set_singleshot_timer, vcpu, &{timeout, flags})`: arms the one-shot
    /// timer of `vcpu`, which must be the calling vCPU (Xen answers `-EINVAL` otherwise),
    /// to raise `VIRQ_TIMER` at system time `timeout_abs_ns`. With
    /// [`VcpuSetSingleshotTimer::FUTURE`] a past timeout is `-ETIME`; without it, it fires
    /// at once.
    pub fn vcpu_set_singleshot_timer(
        self,
        vcpu: u32,
        timeout_abs_ns: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let arg = VcpuSetSingleshotTimer {
            timeout_abs_ns,
            flags,
            pad: 0,
        };
        // SAFETY: Xen reads the argument on this stack frame during the call.
        unsafe {
            self.call(
                nr::VCPU_OP,
                [
                    u64::from(nr::VCPUOP_SET_SINGLESHOT_TIMER),
                    u64::from(vcpu),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `sched_op(SCHEDOP_poll, &{ports, timeout})`: blocks the calling vCPU until one of
    /// `ports` is pending or system time reaches `timeout_abs_ns` (0: no timeout), without
    /// taking an upcall. More than `u32::MAX` ports give `Err(EINVAL)` without a call.
    pub fn sched_poll(self, ports: &[u32], timeout_abs_ns: u64) -> Result<(), Errno> {
        let Ok(nr_ports) = u32::try_from(ports.len()) else {
            return Err(Errno::EINVAL);
        };
        let arg = SchedPoll {
            ports: ports.as_ptr() as u64,
            nr_ports,
            pad: 0,
            timeout: timeout_abs_ns,
        };
        // SAFETY: Xen reads the argument and `nr_ports` ports from the borrowed slice
        // during the call.
        unsafe {
            self.call(
                nr::SCHED_OP,
                [
                    u64::from(nr::SCHEDOP_POLL),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `event_channel_op(EVTCHNOP_bind_virq, &{virq, vcpu})`: binds a virtual IRQ of
    /// `vcpu` to a new port and returns the port.
    pub fn evtchn_bind_virq(self, virq: u32, vcpu: u32) -> Result<u32, Errno> {
        let mut arg = EvtchnBindVirq {
            virq,
            vcpu,
            port: 0,
        };
        // SAFETY: Xen reads and writes the argument on this stack frame during the call.
        unsafe {
            self.call(
                nr::EVENT_CHANNEL_OP,
                [
                    u64::from(nr::EVTCHNOP_BIND_VIRQ),
                    ptr::from_mut(&mut arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }?;
        Ok(arg.port)
    }

    /// `event_channel_op(EVTCHNOP_unmask, &{port})`: clears the port's mask bit and, if it
    /// is pending, raises an upcall on the vCPU it is bound to.
    pub fn evtchn_unmask(self, port: u32) -> Result<(), Errno> {
        let arg = EvtchnUnmask { port };
        // SAFETY: Xen reads the argument on this stack frame during the call.
        unsafe {
            self.call(
                nr::EVENT_CHANNEL_OP,
                [
                    u64::from(nr::EVTCHNOP_UNMASK),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `callback_op(CALLBACKOP_register, &{kind, flags, address})`: sets the calling
    /// vCPU's entry point for `kind` (event upcalls, the failsafe callback, ...).
    ///
    /// # Safety
    ///
    /// `address` must be code of this kernel that copes with Xen's bounce frame for that
    /// callback (for events: `rcx` and `r11` on top of a hardware-like frame, no error
    /// code, returned from with the `iret` hypercall) for as long as it is registered.
    pub unsafe fn callback_register(
        self,
        kind: CallbackType,
        address: u64,
        flags: u16,
    ) -> Result<(), Errno> {
        let arg = CallbackRegister {
            kind: kind.0,
            flags,
            pad: 0,
            address,
        };
        // SAFETY: Xen reads the argument during the call; the handler is the caller's
        // contract.
        unsafe {
            self.call(
                nr::CALLBACK_OP,
                [
                    u64::from(nr::CALLBACKOP_REGISTER),
                    ptr::from_ref(&arg) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(drop)
    }

    /// `update_va_mapping(va, pte, flags)`: replaces the level-1 page-table entry that
    /// maps `va` with `pte` (a machine address and x86 PTE flags) and flushes as `flags`
    /// says ([`nr::UVMF_INVLPG`], ...).
    ///
    /// # Safety
    ///
    /// `va` must be a 4 KiB-mapped page of this kernel that no Rust reference points into
    /// while and after it is remapped, and what `pte` maps there must be memory the kernel
    /// may access as the new mapping allows.
    pub unsafe fn update_va_mapping(self, va: u64, pte: u64, flags: u64) -> Result<(), Errno> {
        // SAFETY: no pointer is passed to Xen; the mapping change is the caller's contract.
        unsafe { self.call(nr::UPDATE_VA_MAPPING, [va, pte, flags, 0, 0]) }.map(drop)
    }
}
