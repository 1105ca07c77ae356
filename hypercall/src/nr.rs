//! Hypercall numbers and public constants of the Xen x86-64 PV ABI.
//!
//! Values come from the `xen-sys` crate's generated bindings where it has them (only its
//! constants are used, never its functions), and are defined here where it does not
//! (the XENPMU interface, `PHYSDEVOP_set_iopl`, `XENVER_version`, `DOMID_SELF`,
//! `XENFEAT_dom0`).
//! The test `layout_vs_xen_headers` checks every value against the C headers of the
//! installed Xen (`/usr/include/xen`).

// ---------------------------------------------------------------------------------------
// Hypercall numbers (the index of the entry in the hypercall page).
// ---------------------------------------------------------------------------------------

/// `set_trap_table`: install the virtual IDT.
pub const SET_TRAP_TABLE: u32 = xen_sys::__HYPERVISOR_set_trap_table;
/// `mmu_update`: update page-table entries.
pub const MMU_UPDATE: u32 = xen_sys::__HYPERVISOR_mmu_update;
/// `set_gdt`: install a GDT from machine frames.
pub const SET_GDT: u32 = xen_sys::__HYPERVISOR_set_gdt;
/// `stack_switch`: set the kernel stack used on a ring change.
pub const STACK_SWITCH: u32 = xen_sys::__HYPERVISOR_stack_switch;
/// `set_callbacks`: register the event, failsafe and syscall callbacks.
pub const SET_CALLBACKS: u32 = xen_sys::__HYPERVISOR_set_callbacks;
/// `memory_op`: memory reservation and translation operations.
pub const MEMORY_OP: u32 = xen_sys::__HYPERVISOR_memory_op;
/// `multicall`: run a batch of hypercalls.
pub const MULTICALL: u32 = xen_sys::__HYPERVISOR_multicall;
/// `update_va_mapping`: update one PTE by virtual address.
pub const UPDATE_VA_MAPPING: u32 = xen_sys::__HYPERVISOR_update_va_mapping;
/// `xen_version`: query the hypervisor version and features.
pub const XEN_VERSION: u32 = xen_sys::__HYPERVISOR_xen_version;
/// `console_io`: read or write the hypervisor console.
pub const CONSOLE_IO: u32 = xen_sys::__HYPERVISOR_console_io;
/// `vm_assist`: enable or disable a VM assist.
pub const VM_ASSIST: u32 = xen_sys::__HYPERVISOR_vm_assist;
/// `iret`: return from an exception frame (entered by `jmp`, never returns).
pub const IRET: u32 = xen_sys::__HYPERVISOR_iret;
/// `vcpu_op`: per-vCPU operations.
pub const VCPU_OP: u32 = xen_sys::__HYPERVISOR_vcpu_op;
/// `set_segment_base`: set the FS or GS base, or load the user GS selector.
pub const SET_SEGMENT_BASE: u32 = xen_sys::__HYPERVISOR_set_segment_base;
/// `mmuext_op`: extended MMU operations (pinning, TLB flushes, new base pointer ...).
pub const MMUEXT_OP: u32 = xen_sys::__HYPERVISOR_mmuext_op;
/// `sched_op`: scheduler operations (yield, block, shutdown ...).
pub const SCHED_OP: u32 = xen_sys::__HYPERVISOR_sched_op;
/// `callback_op`: register or unregister one callback.
pub const CALLBACK_OP: u32 = xen_sys::__HYPERVISOR_callback_op;
/// `event_channel_op`: event-channel operations.
pub const EVENT_CHANNEL_OP: u32 = xen_sys::__HYPERVISOR_event_channel_op;
/// `physdev_op`: physical-device operations (IOPL, IRQs ...).
pub const PHYSDEV_OP: u32 = xen_sys::__HYPERVISOR_physdev_op;
/// `xenpmu_op`: the virtual PMU interface.
pub const XENPMU_OP: u32 = xen_sys::__HYPERVISOR_xenpmu_op;

/// The symbolic name of hypercall number `nr`, for diagnostics.
pub const fn name(nr: u32) -> Option<&'static str> {
    Some(match nr {
        SET_TRAP_TABLE => "set_trap_table",
        MMU_UPDATE => "mmu_update",
        SET_GDT => "set_gdt",
        STACK_SWITCH => "stack_switch",
        SET_CALLBACKS => "set_callbacks",
        MEMORY_OP => "memory_op",
        MULTICALL => "multicall",
        UPDATE_VA_MAPPING => "update_va_mapping",
        XEN_VERSION => "xen_version",
        CONSOLE_IO => "console_io",
        VM_ASSIST => "vm_assist",
        IRET => "iret",
        VCPU_OP => "vcpu_op",
        SET_SEGMENT_BASE => "set_segment_base",
        MMUEXT_OP => "mmuext_op",
        SCHED_OP => "sched_op",
        CALLBACK_OP => "callback_op",
        EVENT_CHANNEL_OP => "event_channel_op",
        PHYSDEV_OP => "physdev_op",
        XENPMU_OP => "xenpmu_op",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// set_segment_base
// ---------------------------------------------------------------------------------------

/// `set_segment_base` selector: the FS base.
pub const SEGBASE_FS: u32 = xen_sys::SEGBASE_FS;
/// `set_segment_base` selector: the user GS base (the one `swapgs` swaps in for user mode).
pub const SEGBASE_GS_USER: u32 = xen_sys::SEGBASE_GS_USER;
/// `set_segment_base` selector: the kernel GS base.
pub const SEGBASE_GS_KERNEL: u32 = xen_sys::SEGBASE_GS_KERNEL;
/// `set_segment_base` selector: load the user GS *selector* from `base[15:0]`.
pub const SEGBASE_GS_USER_SEL: u32 = xen_sys::SEGBASE_GS_USER_SEL;

// ---------------------------------------------------------------------------------------
// sched_op
// ---------------------------------------------------------------------------------------

/// `sched_op` command: give up the CPU voluntarily (no argument).
pub const SCHEDOP_YIELD: u32 = xen_sys::SCHEDOP_yield;
/// `sched_op` command: block until an event arrives (no argument).
pub const SCHEDOP_BLOCK: u32 = xen_sys::SCHEDOP_block;
/// `sched_op` command: shut the domain down (`struct sched_shutdown *`).
pub const SCHEDOP_SHUTDOWN: u32 = xen_sys::SCHEDOP_shutdown;

/// Shutdown reason: power off.
pub const SHUTDOWN_POWEROFF: u32 = xen_sys::SHUTDOWN_poweroff;
/// Shutdown reason: reboot.
pub const SHUTDOWN_REBOOT: u32 = xen_sys::SHUTDOWN_reboot;
/// Shutdown reason: suspend (the call returns when the domain resumes).
pub const SHUTDOWN_SUSPEND: u32 = xen_sys::SHUTDOWN_suspend;
/// Shutdown reason: the domain crashed.
pub const SHUTDOWN_CRASH: u32 = xen_sys::SHUTDOWN_crash;
/// Shutdown reason: the domain's watchdog fired.
pub const SHUTDOWN_WATCHDOG: u32 = xen_sys::SHUTDOWN_watchdog;
/// Shutdown reason: soft reset.
pub const SHUTDOWN_SOFT_RESET: u32 = xen_sys::SHUTDOWN_soft_reset;

// ---------------------------------------------------------------------------------------
// console_io, event_channel_op, physdev_op, xen_version
// ---------------------------------------------------------------------------------------

/// `console_io` command: write `(count, buffer)` to the hypervisor console.
pub const CONSOLEIO_WRITE: u32 = xen_sys::CONSOLEIO_write;
/// `console_io` command: read from the hypervisor console.
pub const CONSOLEIO_READ: u32 = xen_sys::CONSOLEIO_read;

/// `event_channel_op` command: notify the remote end of a port (`struct evtchn_send *`).
pub const EVTCHNOP_SEND: u32 = xen_sys::EVTCHNOP_send;

/// `physdev_op` command: set the kernel's I/O privilege level (`struct physdev_set_iopl *`).
/// Not in `xen-sys`.
pub const PHYSDEVOP_SET_IOPL: u32 = 6;

/// `sched_op` command: block until one of some ports is pending or a timeout passes
/// (`struct sched_poll *`). Not in `xen-sys`.
pub const SCHEDOP_POLL: u32 = 3;

/// `event_channel_op` command: bind a virtual IRQ to a vCPU (`struct evtchn_bind_virq *`).
pub const EVTCHNOP_BIND_VIRQ: u32 = xen_sys::EVTCHNOP_bind_virq;
/// `event_channel_op` command: unmask a port, re-raising it if it is pending
/// (`struct evtchn_unmask *`). Not in `xen-sys`.
pub const EVTCHNOP_UNMASK: u32 = 9;

/// The per-vCPU timer VIRQ (the periodic tick and the single-shot timer).
pub const VIRQ_TIMER: u32 = xen_sys::VIRQ_TIMER;

// ---------------------------------------------------------------------------------------
// vcpu_op, callback_op, update_va_mapping, xen_version (not in xen-sys)
// ---------------------------------------------------------------------------------------

/// `vcpu_op`: set the initial context of a down vCPU (`struct vcpu_guest_context *`).
pub const VCPUOP_INITIALISE: u32 = 0;
/// `vcpu_op`: start an initialised vCPU.
pub const VCPUOP_UP: u32 = 1;
/// `vcpu_op`: stop a vCPU.
pub const VCPUOP_DOWN: u32 = 2;
/// `vcpu_op`: 1 if the vCPU is up, 0 if not (`-ENOENT` if it does not exist).
pub const VCPUOP_IS_UP: u32 = 3;
/// `vcpu_op`: copy out a vCPU's run-state accounting (`struct vcpu_runstate_info *`).
pub const VCPUOP_GET_RUNSTATE_INFO: u32 = 4;
/// `vcpu_op`: start the periodic timer (`struct vcpu_set_periodic_timer *`).
pub const VCPUOP_SET_PERIODIC_TIMER: u32 = 6;
/// `vcpu_op`: stop the periodic timer (NULL argument).
pub const VCPUOP_STOP_PERIODIC_TIMER: u32 = 7;
/// `vcpu_op`: arm the calling vCPU's one-shot timer (`struct vcpu_set_singleshot_timer *`).
pub const VCPUOP_SET_SINGLESHOT_TIMER: u32 = 8;
/// `vcpu_op`: disarm the calling vCPU's one-shot timer (NULL argument).
pub const VCPUOP_STOP_SINGLESHOT_TIMER: u32 = 9;

/// `callback_op`: register a callback (`struct callback_register *`).
pub const CALLBACKOP_REGISTER: u32 = 0;

/// `update_va_mapping` flags: flush only the one TLB entry.
pub const UVMF_INVLPG: u64 = 2;
/// `update_va_mapping` flags: flush on every vCPU of the domain (with a flush type).
pub const UVMF_ALL: u64 = 4;

/// `xen_version` command: the hypervisor's version as the result, `major << 16 | minor`
/// (NULL argument). Not in `xen-sys`.
pub const XENVER_VERSION: u32 = 0;

// ---------------------------------------------------------------------------------------
// xenpmu_op (none of this is in xen-sys)
// ---------------------------------------------------------------------------------------

/// XENPMU op: get the vPMU mode (also reports the interface version).
pub const XENPMU_MODE_GET: u32 = 0;
/// XENPMU op: set the vPMU mode (privileged).
pub const XENPMU_MODE_SET: u32 = 1;
/// XENPMU op: get the vPMU features.
pub const XENPMU_FEATURE_GET: u32 = 2;
/// XENPMU op: set the vPMU features (privileged).
pub const XENPMU_FEATURE_SET: u32 = 3;
/// XENPMU op: register a vCPU's shared PMU page (`val` = its MFN).
pub const XENPMU_INIT: u32 = 4;
/// XENPMU op: unregister a vCPU's shared PMU page.
pub const XENPMU_FINISH: u32 = 5;
/// XENPMU op: load `lapic_lvtpc` from the shared page (NULL argument).
pub const XENPMU_LVTPC_SET: u32 = 6;
/// XENPMU op: write the cached context back and clear `PMU_CACHED` (NULL argument).
pub const XENPMU_FLUSH: u32 = 7;

/// XENPMU interface major version; Xen rejects any other.
pub const XENPMU_VER_MAJ: u32 = 0;
/// XENPMU interface minor version.
pub const XENPMU_VER_MIN: u32 = 1;

/// The virtual IRQ Xen raises for a PMU interrupt.
pub const VIRQ_XENPMU: u32 = xen_sys::VIRQ_XENPMU;

// ---------------------------------------------------------------------------------------
// start_info, domains, features
// ---------------------------------------------------------------------------------------

/// `start_info.flags`: the domain is privileged.
pub const SIF_PRIVILEGED: u32 = xen_sys::SIF_PRIVILEGED;
/// `start_info.flags`: the domain is the initial (control) domain.
pub const SIF_INITDOMAIN: u32 = xen_sys::SIF_INITDOMAIN;
/// `start_info.flags`: `mod_start` is a PFN, not a virtual address.
pub const SIF_MOD_START_PFN: u32 = xen_sys::SIF_MOD_START_PFN;

/// The domain ID meaning "the calling domain". Not in `xen-sys`.
pub const DOMID_SELF: u16 = 0x7ff0;

/// Feature bit a kernel must advertise (in `SUPPORTED_FEATURES`) to boot as dom0.
/// Not in `xen-sys`.
pub const XENFEAT_DOM0: u32 = 11;

/// The flat 64-bit kernel code selector Xen uses for a PV kernel.
pub const FLAT_KERNEL_CS: u16 = xen_sys::FLAT_KERNEL_CS as u16;
/// The flat 64-bit kernel stack selector Xen uses for a PV kernel.
pub const FLAT_KERNEL_SS: u16 = xen_sys::FLAT_KERNEL_SS as u16;

// ---------------------------------------------------------------------------------------
// ELF notes (name "Xen")
// ---------------------------------------------------------------------------------------

/// ELF note type: entry point (number).
pub const XEN_ELFNOTE_ENTRY: u32 = xen_sys::XEN_ELFNOTE_ENTRY;
/// ELF note type: virtual address of the hypercall page Xen fills (number).
pub const XEN_ELFNOTE_HYPERCALL_PAGE: u32 = xen_sys::XEN_ELFNOTE_HYPERCALL_PAGE;
/// ELF note type: virtual base of the kernel (number).
pub const XEN_ELFNOTE_VIRT_BASE: u32 = xen_sys::XEN_ELFNOTE_VIRT_BASE;
/// ELF note type: virtual minus physical address offset (number).
pub const XEN_ELFNOTE_PADDR_OFFSET: u32 = xen_sys::XEN_ELFNOTE_PADDR_OFFSET;
/// ELF note type: Xen interface version, must start with `xen-3.0` (string).
pub const XEN_ELFNOTE_XEN_VERSION: u32 = xen_sys::XEN_ELFNOTE_XEN_VERSION;
/// ELF note type: guest OS name (string).
pub const XEN_ELFNOTE_GUEST_OS: u32 = xen_sys::XEN_ELFNOTE_GUEST_OS;
/// ELF note type: guest OS version (string).
pub const XEN_ELFNOTE_GUEST_VERSION: u32 = xen_sys::XEN_ELFNOTE_GUEST_VERSION;
/// ELF note type: loader, `generic` for a non-Linux kernel (string).
pub const XEN_ELFNOTE_LOADER: u32 = xen_sys::XEN_ELFNOTE_LOADER;
/// ELF note type: PAE mode, `yes` (string).
pub const XEN_ELFNOTE_PAE_MODE: u32 = xen_sys::XEN_ELFNOTE_PAE_MODE;
/// ELF note type: `|`-separated feature list, `!` marks a required one (string).
pub const XEN_ELFNOTE_FEATURES: u32 = xen_sys::XEN_ELFNOTE_FEATURES;
/// ELF note type: lowest hypervisor virtual address (number).
pub const XEN_ELFNOTE_HV_START_LOW: u32 = xen_sys::XEN_ELFNOTE_HV_START_LOW;
/// ELF note type: L1 MFN-valid mask and value (numbers).
pub const XEN_ELFNOTE_L1_MFN_VALID: u32 = xen_sys::XEN_ELFNOTE_L1_MFN_VALID;
/// ELF note type: the kernel supports suspend cancellation (number).
pub const XEN_ELFNOTE_SUSPEND_CANCEL: u32 = xen_sys::XEN_ELFNOTE_SUSPEND_CANCEL;
/// ELF note type: virtual address for the initial p2m table (number).
pub const XEN_ELFNOTE_INIT_P2M: u32 = xen_sys::XEN_ELFNOTE_INIT_P2M;
/// ELF note type: the kernel accepts `mod_start` as a PFN (number).
pub const XEN_ELFNOTE_MOD_START_PFN: u32 = xen_sys::XEN_ELFNOTE_MOD_START_PFN;
/// ELF note type: bitmask of supported `XENFEAT_*` (number).
pub const XEN_ELFNOTE_SUPPORTED_FEATURES: u32 = xen_sys::XEN_ELFNOTE_SUPPORTED_FEATURES;
