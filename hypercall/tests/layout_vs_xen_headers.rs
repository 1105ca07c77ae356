//! Cross-checks every ABI struct, field and constant of this crate against the Xen public
//! headers installed by Debian's `libxen-dev` (`/usr/include/xen`), compiled with gcc
//! (or another release's public headers: see `XENMSR_XEN_INCLUDE`).
//!
//! For each struct the test emits `sizeof`, and for each field `offsetof` and the field's
//! `sizeof`, into a small C program; it compiles and runs it and compares every line with
//! the Rust `size_of`/`offset_of!` values. Mismatches name the Rust struct and field and
//! the C expression. Constants (hypercall numbers, op codes, flags, errnos) are compared
//! the same way.
//!
//! Without the headers (or gcc) the test fails and says how to install them
//! (`apt-get install -y libxen-dev gcc`); set `XENMSR_SKIP_XEN_HEADERS=1` to skip it
//! deliberately instead.

use std::fmt::Write as _;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use xenmsr_hypercall::abi::pmu::{
    LAPIC_LVTPC_OFFSET, PMU_CTXT_OFFSET, PMU_FLAGS_OFFSET, XENPMU_CTXT_PAD_SZ, XENPMU_REGS_PAD_SZ,
};
use xenmsr_hypercall::abi::xenstore as xs;
use xenmsr_hypercall::abi::{
    ArchSharedInfo, ArchVcpuInfo, CALLBACKF_MASK_EVENTS, CallbackRegister, CallbackType,
    CpuUserRegs, EvtchnBindVirq, EvtchnUnmask, LEGACY_MAX_VCPUS, SchedPoll, SharedInfo,
    VcpuGuestContext, VcpuInfo, VcpuRunstateInfo, VcpuSetSingleshotTimer, VcpuTimeInfo,
};
use xenmsr_hypercall::abi::{
    EvtchnSend, MulticallEntry, PhysdevSetIopl, PmuFlags, SchedShutdown, SegmentBase,
    ShutdownReason, StartInfo, TrapInfo, XenPmuAmdCtxt, XenPmuArch, XenPmuCntrPair, XenPmuData,
    XenPmuFeature, XenPmuIntelCtxt, XenPmuMode, XenPmuOp, XenPmuParams, XenPmuRegs,
    XenconsInterface,
};
use xenmsr_hypercall::abi::{XenstoreDomainInterface, XsdSockmsg};
use xenmsr_hypercall::{Errno, nr};

/// One value computed on both sides.
struct Check {
    /// What the Rust side measured, e.g. `offset_of!(XenPmuData, pmu.pmu_flags)`.
    rust_what: String,
    rust: u64,
    /// The C expression that must have the same value.
    c_expr: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, rust_what: impl Into<String>, rust: u64, c_expr: impl Into<String>) {
        self.0.push(Check {
            rust_what: rust_what.into(),
            rust,
            c_expr: c_expr.into(),
        });
    }
}

/// `size_of` the field a projection closure returns.
fn field_size<S, F>(_: fn(&S) -> &F) -> usize {
    size_of::<F>()
}

/// `size!(checks, RustType, "c_struct")`.
macro_rules! size {
    ($checks:ident, $rust:ty, $c:literal) => {
        $checks.add(
            concat!("size_of::<", stringify!($rust), ">()"),
            size_of::<$rust>() as u64,
            concat!("sizeof(struct ", $c, ")"),
        )
    };
}

/// `field!(checks, RustType, rust.field.path, "c_struct", "c.field.path")`: the offset
/// and the size of the field.
macro_rules! field {
    ($checks:ident, $rust:ty, $($rf:ident).+, $c:literal, $cf:literal) => {{
        $checks.add(
            concat!("offset_of!(", stringify!($rust), ", ", stringify!($($rf).+), ")"),
            offset_of!($rust, $($rf).+) as u64,
            concat!("offsetof(struct ", $c, ", ", $cf, ")"),
        );
        $checks.add(
            concat!("size of ", stringify!($rust), ".", stringify!($($rf).+)),
            field_size::<$rust, _>(|s| &s.$($rf).+) as u64,
            concat!("sizeof(((struct ", $c, " *)0)->", $cf, ")"),
        );
    }};
}

/// `for_fields!(checks, RustType, "c_struct", { rust_field "c_field", ... })`: [`field!`]
/// for each pair.
macro_rules! for_fields {
    ($checks:ident, $rust:ty, $c:literal, { $($rf:ident $cf:literal),+ $(,)? }) => {
        $(field!($checks, $rust, $rf, $c, $cf);)+
    };
}

/// `constant!(checks, rust_expr, "C_MACRO")`.
macro_rules! constant {
    ($checks:ident, $rust:expr, $c:literal) => {
        $checks.add(
            stringify!($rust),
            ($rust) as u64,
            concat!("(unsigned long long)(", $c, ")"),
        )
    };
}

fn layout_checks() -> Checks {
    let mut c = Checks::default();

    // xen/pmu.h
    size!(c, XenPmuParams, "xen_pmu_params");
    field!(
        c,
        XenPmuParams,
        version_maj,
        "xen_pmu_params",
        "version.maj"
    );
    field!(
        c,
        XenPmuParams,
        version_min,
        "xen_pmu_params",
        "version.min"
    );
    field!(c, XenPmuParams, val, "xen_pmu_params", "val");
    field!(c, XenPmuParams, vcpu, "xen_pmu_params", "vcpu");
    field!(c, XenPmuParams, pad, "xen_pmu_params", "pad");

    size!(c, XenPmuData, "xen_pmu_data");
    field!(c, XenPmuData, vcpu_id, "xen_pmu_data", "vcpu_id");
    field!(c, XenPmuData, pcpu_id, "xen_pmu_data", "pcpu_id");
    field!(c, XenPmuData, domain_id, "xen_pmu_data", "domain_id");
    field!(c, XenPmuData, pad, "xen_pmu_data", "pad");
    field!(c, XenPmuData, pmu, "xen_pmu_data", "pmu");

    // xen/arch-x86/pmu.h
    size!(c, XenPmuRegs, "xen_pmu_regs");
    field!(c, XenPmuRegs, ip, "xen_pmu_regs", "ip");
    field!(c, XenPmuRegs, sp, "xen_pmu_regs", "sp");
    field!(c, XenPmuRegs, flags, "xen_pmu_regs", "flags");
    field!(c, XenPmuRegs, cs, "xen_pmu_regs", "cs");
    field!(c, XenPmuRegs, ss, "xen_pmu_regs", "ss");
    field!(c, XenPmuRegs, cpl, "xen_pmu_regs", "cpl");
    field!(c, XenPmuRegs, pad, "xen_pmu_regs", "pad");

    size!(c, XenPmuCntrPair, "xen_pmu_cntr_pair");
    field!(c, XenPmuCntrPair, counter, "xen_pmu_cntr_pair", "counter");
    field!(c, XenPmuCntrPair, control, "xen_pmu_cntr_pair", "control");

    size!(c, XenPmuIntelCtxt, "xen_pmu_intel_ctxt");
    field!(
        c,
        XenPmuIntelCtxt,
        fixed_counters,
        "xen_pmu_intel_ctxt",
        "fixed_counters"
    );
    field!(
        c,
        XenPmuIntelCtxt,
        arch_counters,
        "xen_pmu_intel_ctxt",
        "arch_counters"
    );
    field!(
        c,
        XenPmuIntelCtxt,
        global_ctrl,
        "xen_pmu_intel_ctxt",
        "global_ctrl"
    );
    field!(
        c,
        XenPmuIntelCtxt,
        global_ovf_ctrl,
        "xen_pmu_intel_ctxt",
        "global_ovf_ctrl"
    );
    field!(
        c,
        XenPmuIntelCtxt,
        global_status,
        "xen_pmu_intel_ctxt",
        "global_status"
    );
    field!(
        c,
        XenPmuIntelCtxt,
        fixed_ctrl,
        "xen_pmu_intel_ctxt",
        "fixed_ctrl"
    );
    field!(c, XenPmuIntelCtxt, ds_area, "xen_pmu_intel_ctxt", "ds_area");
    field!(
        c,
        XenPmuIntelCtxt,
        pebs_enable,
        "xen_pmu_intel_ctxt",
        "pebs_enable"
    );
    field!(
        c,
        XenPmuIntelCtxt,
        debugctl,
        "xen_pmu_intel_ctxt",
        "debugctl"
    );
    // The flexible register bank starts right after the fixed part.
    c.add(
        "size_of::<XenPmuIntelCtxt>() (start of the bank)",
        size_of::<XenPmuIntelCtxt>() as u64,
        "offsetof(struct xen_pmu_intel_ctxt, regs)",
    );

    size!(c, XenPmuAmdCtxt, "xen_pmu_amd_ctxt");
    field!(c, XenPmuAmdCtxt, counters, "xen_pmu_amd_ctxt", "counters");
    field!(c, XenPmuAmdCtxt, ctrls, "xen_pmu_amd_ctxt", "ctrls");
    c.add(
        "size_of::<XenPmuAmdCtxt>() (start of the bank)",
        size_of::<XenPmuAmdCtxt>() as u64,
        "offsetof(struct xen_pmu_amd_ctxt, regs)",
    );

    // The unions of xen_pmu_arch, modelled as structs (see abi::pmu).
    size!(c, XenPmuArch, "xen_pmu_arch");
    field!(c, XenPmuArch, r, "xen_pmu_arch", "r");
    field!(c, XenPmuArch, r.regs, "xen_pmu_arch", "r.regs");
    field!(c, XenPmuArch, r.regs.cpl, "xen_pmu_arch", "r.regs.cpl");
    field!(c, XenPmuArch, pmu_flags, "xen_pmu_arch", "pmu_flags");
    field!(c, XenPmuArch, l, "xen_pmu_arch", "l");
    field!(
        c,
        XenPmuArch,
        l.lapic_lvtpc,
        "xen_pmu_arch",
        "l.lapic_lvtpc"
    );
    field!(c, XenPmuArch, c, "xen_pmu_arch", "c");
    c.add(
        "offset_of!(XenPmuArch, c) (Intel view)",
        offset_of!(XenPmuArch, c) as u64,
        "offsetof(struct xen_pmu_arch, c.intel)",
    );
    c.add(
        "offset_of!(XenPmuArch, c) (AMD view)",
        offset_of!(XenPmuArch, c) as u64,
        "offsetof(struct xen_pmu_arch, c.amd)",
    );
    c.add(
        "offset_of!(XenPmuArch, c) + offset_of!(XenPmuIntelCtxt, global_ctrl)",
        (offset_of!(XenPmuArch, c) + offset_of!(XenPmuIntelCtxt, global_ctrl)) as u64,
        "offsetof(struct xen_pmu_arch, c.intel.global_ctrl)",
    );
    c.add(
        "offset_of!(XenPmuArch, c) + offset_of!(XenPmuAmdCtxt, ctrls)",
        (offset_of!(XenPmuArch, c) + offset_of!(XenPmuAmdCtxt, ctrls)) as u64,
        "offsetof(struct xen_pmu_arch, c.amd.ctrls)",
    );
    c.add(
        "XENPMU_REGS_PAD_SZ",
        XENPMU_REGS_PAD_SZ as u64,
        "XENPMU_REGS_PAD_SZ",
    );
    c.add(
        "XENPMU_CTXT_PAD_SZ",
        XENPMU_CTXT_PAD_SZ as u64,
        "XENPMU_CTXT_PAD_SZ",
    );

    // Page-absolute offsets used by the vPMU code.
    c.add(
        "PMU_FLAGS_OFFSET",
        PMU_FLAGS_OFFSET as u64,
        "offsetof(struct xen_pmu_data, pmu.pmu_flags)",
    );
    c.add(
        "LAPIC_LVTPC_OFFSET",
        LAPIC_LVTPC_OFFSET as u64,
        "offsetof(struct xen_pmu_data, pmu.l.lapic_lvtpc)",
    );
    c.add(
        "PMU_CTXT_OFFSET",
        PMU_CTXT_OFFSET as u64,
        "offsetof(struct xen_pmu_data, pmu.c.intel)",
    );
    c.add(
        "PMU_CTXT_OFFSET",
        PMU_CTXT_OFFSET as u64,
        "offsetof(struct xen_pmu_data, pmu.c.amd)",
    );

    // xen/arch-x86/xen.h, xen/xen.h
    size!(c, TrapInfo, "trap_info");
    field!(c, TrapInfo, vector, "trap_info", "vector");
    field!(c, TrapInfo, flags, "trap_info", "flags");
    field!(c, TrapInfo, cs, "trap_info", "cs");
    field!(c, TrapInfo, address, "trap_info", "address");

    size!(c, MulticallEntry, "multicall_entry");
    field!(c, MulticallEntry, op, "multicall_entry", "op");
    field!(c, MulticallEntry, result, "multicall_entry", "result");
    field!(c, MulticallEntry, args, "multicall_entry", "args");

    size!(c, StartInfo, "start_info");
    field!(c, StartInfo, magic, "start_info", "magic");
    field!(c, StartInfo, nr_pages, "start_info", "nr_pages");
    field!(c, StartInfo, shared_info, "start_info", "shared_info");
    field!(c, StartInfo, flags, "start_info", "flags");
    field!(c, StartInfo, store_mfn, "start_info", "store_mfn");
    field!(c, StartInfo, store_evtchn, "start_info", "store_evtchn");
    field!(c, StartInfo, console_mfn, "start_info", "console.domU.mfn");
    field!(
        c,
        StartInfo,
        console_evtchn,
        "start_info",
        "console.domU.evtchn"
    );
    field!(c, StartInfo, pt_base, "start_info", "pt_base");
    field!(c, StartInfo, nr_pt_frames, "start_info", "nr_pt_frames");
    field!(c, StartInfo, mfn_list, "start_info", "mfn_list");
    field!(c, StartInfo, mod_start, "start_info", "mod_start");
    field!(c, StartInfo, mod_len, "start_info", "mod_len");
    field!(c, StartInfo, cmd_line, "start_info", "cmd_line");
    field!(c, StartInfo, first_p2m_pfn, "start_info", "first_p2m_pfn");
    field!(c, StartInfo, nr_p2m_frames, "start_info", "nr_p2m_frames");
    // The dom0 view of the console union: the halves of `console_mfn`.
    c.add(
        "offset_of!(StartInfo, console_mfn) (dom0 info_off = low half)",
        offset_of!(StartInfo, console_mfn) as u64,
        "offsetof(struct start_info, console.dom0.info_off)",
    );
    c.add(
        "offset_of!(StartInfo, console_mfn) + 4 (dom0 info_size = high half)",
        offset_of!(StartInfo, console_mfn) as u64 + 4,
        "offsetof(struct start_info, console.dom0.info_size)",
    );
    c.add(
        "size of StartInfo::dom0_console_info_off()",
        size_of::<u32>() as u64,
        "sizeof(((struct start_info *)0)->console.dom0.info_off)",
    );
    c.add(
        "size of StartInfo::dom0_console_info_size()",
        size_of::<u32>() as u64,
        "sizeof(((struct start_info *)0)->console.dom0.info_size)",
    );

    // xen/sched.h, xen/event_channel.h, xen/physdev.h
    size!(c, SchedShutdown, "sched_shutdown");
    field!(c, SchedShutdown, reason, "sched_shutdown", "reason");
    size!(c, EvtchnSend, "evtchn_send");
    field!(c, EvtchnSend, port, "evtchn_send", "port");
    size!(c, PhysdevSetIopl, "physdev_set_iopl");
    field!(c, PhysdevSetIopl, iopl, "physdev_set_iopl", "iopl");

    // xen/arch-x86/xen-x86_64.h, xen/arch-x86/xen.h, xen/xen.h: vCPUs and events
    size!(c, CpuUserRegs, "cpu_user_regs");
    for_fields!(c, CpuUserRegs, "cpu_user_regs", {
        r15 "r15", r14 "r14", r13 "r13", r12 "r12", rbp "rbp", rbx "rbx", r11 "r11",
        r10 "r10", r9 "r9", r8 "r8", rax "rax", rcx "rcx", rdx "rdx", rsi "rsi", rdi "rdi",
        error_code "error_code", entry_vector "entry_vector", rip "rip", cs "cs",
        saved_upcall_mask "saved_upcall_mask", rflags "rflags", rsp "rsp", ss "ss",
        es "es", ds "ds", fs "fs", gs "gs"
    });
    size!(c, VcpuGuestContext, "vcpu_guest_context");
    for_fields!(c, VcpuGuestContext, "vcpu_guest_context", {
        fpu_ctxt "fpu_ctxt", flags "flags", user_regs "user_regs", trap_ctxt "trap_ctxt",
        ldt_base "ldt_base", ldt_ents "ldt_ents", gdt_frames "gdt_frames",
        gdt_ents "gdt_ents", kernel_ss "kernel_ss", kernel_sp "kernel_sp",
        ctrlreg "ctrlreg", debugreg "debugreg", event_callback_eip "event_callback_eip",
        failsafe_callback_eip "failsafe_callback_eip",
        syscall_callback_eip "syscall_callback_eip", vm_assist "vm_assist",
        fs_base "fs_base", gs_base_kernel "gs_base_kernel", gs_base_user "gs_base_user"
    });
    size!(c, VcpuTimeInfo, "vcpu_time_info");
    for_fields!(c, VcpuTimeInfo, "vcpu_time_info", {
        version "version", tsc_timestamp "tsc_timestamp", system_time "system_time",
        tsc_to_system_mul "tsc_to_system_mul", tsc_shift "tsc_shift", flags "flags"
    });
    size!(c, ArchVcpuInfo, "arch_vcpu_info");
    field!(c, ArchVcpuInfo, cr2, "arch_vcpu_info", "cr2");
    size!(c, VcpuInfo, "vcpu_info");
    for_fields!(c, VcpuInfo, "vcpu_info", {
        evtchn_upcall_pending "evtchn_upcall_pending",
        evtchn_upcall_mask "evtchn_upcall_mask",
        evtchn_pending_sel "evtchn_pending_sel", arch "arch", time "time"
    });
    size!(c, ArchSharedInfo, "arch_shared_info");
    for_fields!(c, ArchSharedInfo, "arch_shared_info", {
        max_pfn "max_pfn", pfn_to_mfn_frame_list_list "pfn_to_mfn_frame_list_list",
        nmi_reason "nmi_reason", p2m_cr3 "p2m_cr3", p2m_vaddr "p2m_vaddr",
        p2m_generation "p2m_generation"
    });
    size!(c, SharedInfo, "shared_info");
    for_fields!(c, SharedInfo, "shared_info", {
        vcpu_info "vcpu_info", evtchn_pending "evtchn_pending", evtchn_mask "evtchn_mask",
        wc_version "wc_version", wc_sec "wc_sec", wc_nsec "wc_nsec",
        wc_sec_hi "wc_sec_hi", arch "arch"
    });
    size!(c, EvtchnBindVirq, "evtchn_bind_virq");
    for_fields!(c, EvtchnBindVirq, "evtchn_bind_virq", { virq "virq", vcpu "vcpu", port "port" });
    size!(c, EvtchnUnmask, "evtchn_unmask");
    field!(c, EvtchnUnmask, port, "evtchn_unmask", "port");
    size!(c, VcpuSetSingleshotTimer, "vcpu_set_singleshot_timer");
    for_fields!(c, VcpuSetSingleshotTimer, "vcpu_set_singleshot_timer", {
        timeout_abs_ns "timeout_abs_ns", flags "flags"
    });
    size!(c, VcpuRunstateInfo, "vcpu_runstate_info");
    for_fields!(c, VcpuRunstateInfo, "vcpu_runstate_info", {
        state "state", state_entry_time "state_entry_time", time "time"
    });
    size!(c, SchedPoll, "sched_poll");
    for_fields!(c, SchedPoll, "sched_poll", {
        ports "ports", nr_ports "nr_ports", timeout "timeout"
    });
    size!(c, CallbackRegister, "callback_register");
    for_fields!(c, CallbackRegister, "callback_register", {
        kind "type", flags "flags", address "address"
    });

    // xen/io/console.h. Xen 4.19 appended `uint8_t connection` (the backend's "serviced"
    // flag; its reset value 0 means connected, so a guest that never reads it behaves as
    // before) and the struct grew from 3088 to 3092 bytes. The crate keeps the layout
    // every release shares, so against newer headers it must end exactly where
    // `connection` starts (`XENMSR_XENCONS_SHARED_SIZE` in the C prelude).
    c.add(
        "size_of::<XenconsInterface>()",
        size_of::<XenconsInterface>() as u64,
        "XENMSR_XENCONS_SHARED_SIZE",
    );
    field!(c, XenconsInterface, in_, "xencons_interface", "in");
    field!(c, XenconsInterface, out, "xencons_interface", "out");
    field!(c, XenconsInterface, in_cons, "xencons_interface", "in_cons");
    field!(c, XenconsInterface, in_prod, "xencons_interface", "in_prod");
    field!(
        c,
        XenconsInterface,
        out_cons,
        "xencons_interface",
        "out_cons"
    );
    field!(
        c,
        XenconsInterface,
        out_prod,
        "xencons_interface",
        "out_prod"
    );

    // xen/io/xs_wire.h: the xenstore ring and message header. Newer releases append
    // fields after `error` (4.22's struct is 2080 bytes); the crate keeps the part every
    // release shares, so the C struct must be at least as large, every shared field at
    // the same offset.
    let xs_size = size_of::<XenstoreDomainInterface>();
    c.add(
        "size_of::<XenstoreDomainInterface>() (at most C's)",
        xs_size as u64,
        format!(
            "(sizeof(struct xenstore_domain_interface) >= {xs_size} ? {xs_size} : sizeof(struct xenstore_domain_interface))"
        ),
    );
    field!(
        c,
        XenstoreDomainInterface,
        req,
        "xenstore_domain_interface",
        "req"
    );
    field!(
        c,
        XenstoreDomainInterface,
        rsp,
        "xenstore_domain_interface",
        "rsp"
    );
    field!(
        c,
        XenstoreDomainInterface,
        req_cons,
        "xenstore_domain_interface",
        "req_cons"
    );
    field!(
        c,
        XenstoreDomainInterface,
        req_prod,
        "xenstore_domain_interface",
        "req_prod"
    );
    field!(
        c,
        XenstoreDomainInterface,
        rsp_cons,
        "xenstore_domain_interface",
        "rsp_cons"
    );
    field!(
        c,
        XenstoreDomainInterface,
        rsp_prod,
        "xenstore_domain_interface",
        "rsp_prod"
    );
    field!(
        c,
        XenstoreDomainInterface,
        server_features,
        "xenstore_domain_interface",
        "server_features"
    );
    field!(
        c,
        XenstoreDomainInterface,
        connection,
        "xenstore_domain_interface",
        "connection"
    );
    field!(
        c,
        XenstoreDomainInterface,
        error,
        "xenstore_domain_interface",
        "error"
    );
    c.add(
        "size_of::<XsdSockmsg>()",
        size_of::<XsdSockmsg>() as u64,
        "sizeof(struct xsd_sockmsg)",
    );
    field!(c, XsdSockmsg, type_, "xsd_sockmsg", "type");
    field!(c, XsdSockmsg, req_id, "xsd_sockmsg", "req_id");
    field!(c, XsdSockmsg, tx_id, "xsd_sockmsg", "tx_id");
    field!(c, XsdSockmsg, len, "xsd_sockmsg", "len");
    c
}

fn constant_checks() -> Checks {
    let mut c = Checks::default();
    // Hypercall numbers.
    constant!(c, nr::SET_TRAP_TABLE, "__HYPERVISOR_set_trap_table");
    constant!(c, nr::MMU_UPDATE, "__HYPERVISOR_mmu_update");
    constant!(c, nr::SET_GDT, "__HYPERVISOR_set_gdt");
    constant!(c, nr::STACK_SWITCH, "__HYPERVISOR_stack_switch");
    constant!(c, nr::SET_CALLBACKS, "__HYPERVISOR_set_callbacks");
    constant!(c, nr::MEMORY_OP, "__HYPERVISOR_memory_op");
    constant!(c, nr::MULTICALL, "__HYPERVISOR_multicall");
    constant!(c, nr::UPDATE_VA_MAPPING, "__HYPERVISOR_update_va_mapping");
    constant!(c, nr::XEN_VERSION, "__HYPERVISOR_xen_version");
    constant!(c, nr::CONSOLE_IO, "__HYPERVISOR_console_io");
    constant!(c, nr::VM_ASSIST, "__HYPERVISOR_vm_assist");
    constant!(c, nr::IRET, "__HYPERVISOR_iret");
    constant!(c, nr::VCPU_OP, "__HYPERVISOR_vcpu_op");
    constant!(c, nr::SET_SEGMENT_BASE, "__HYPERVISOR_set_segment_base");
    constant!(c, nr::MMUEXT_OP, "__HYPERVISOR_mmuext_op");
    constant!(c, nr::SCHED_OP, "__HYPERVISOR_sched_op");
    constant!(c, nr::CALLBACK_OP, "__HYPERVISOR_callback_op");
    constant!(c, nr::EVENT_CHANNEL_OP, "__HYPERVISOR_event_channel_op");
    constant!(c, nr::PHYSDEV_OP, "__HYPERVISOR_physdev_op");
    constant!(c, nr::XENPMU_OP, "__HYPERVISOR_xenpmu_op");
    // Sub-ops and arguments.
    constant!(c, nr::SEGBASE_FS, "SEGBASE_FS");
    constant!(c, nr::SEGBASE_GS_USER, "SEGBASE_GS_USER");
    constant!(c, nr::SEGBASE_GS_KERNEL, "SEGBASE_GS_KERNEL");
    constant!(c, nr::SEGBASE_GS_USER_SEL, "SEGBASE_GS_USER_SEL");
    constant!(c, SegmentBase::FS.0, "SEGBASE_FS");
    constant!(c, SegmentBase::GS_USER.0, "SEGBASE_GS_USER");
    constant!(c, SegmentBase::GS_KERNEL.0, "SEGBASE_GS_KERNEL");
    constant!(c, SegmentBase::GS_USER_SEL.0, "SEGBASE_GS_USER_SEL");
    constant!(c, nr::SCHEDOP_YIELD, "SCHEDOP_yield");
    constant!(c, nr::SCHEDOP_BLOCK, "SCHEDOP_block");
    constant!(c, nr::SCHEDOP_SHUTDOWN, "SCHEDOP_shutdown");
    constant!(c, ShutdownReason::POWEROFF.0, "SHUTDOWN_poweroff");
    constant!(c, ShutdownReason::REBOOT.0, "SHUTDOWN_reboot");
    constant!(c, ShutdownReason::SUSPEND.0, "SHUTDOWN_suspend");
    constant!(c, ShutdownReason::CRASH.0, "SHUTDOWN_crash");
    constant!(c, ShutdownReason::WATCHDOG.0, "SHUTDOWN_watchdog");
    constant!(c, ShutdownReason::SOFT_RESET.0, "SHUTDOWN_soft_reset");
    constant!(c, nr::CONSOLEIO_WRITE, "CONSOLEIO_write");
    // xenstore (xen/io/xs_wire.h).
    constant!(c, xs::XENSTORE_RING_SIZE, "XENSTORE_RING_SIZE");
    constant!(c, xs::XENSTORE_PAYLOAD_MAX, "XENSTORE_PAYLOAD_MAX");
    constant!(c, xs::XS_READ, "XS_READ");
    constant!(c, xs::XS_WATCH, "XS_WATCH");
    constant!(c, xs::XS_UNWATCH, "XS_UNWATCH");
    constant!(c, xs::XS_WRITE, "XS_WRITE");
    constant!(c, xs::XS_RM, "XS_RM");
    constant!(c, xs::XS_WATCH_EVENT, "XS_WATCH_EVENT");
    constant!(c, xs::XS_ERROR, "XS_ERROR");
    constant!(c, nr::CONSOLEIO_READ, "CONSOLEIO_read");
    constant!(c, nr::EVTCHNOP_SEND, "EVTCHNOP_send");
    constant!(c, nr::PHYSDEVOP_SET_IOPL, "PHYSDEVOP_set_iopl");
    constant!(c, nr::XENVER_VERSION, "XENVER_version");
    constant!(c, nr::VIRQ_XENPMU, "VIRQ_XENPMU");
    constant!(c, nr::SCHEDOP_POLL, "SCHEDOP_poll");
    constant!(c, nr::EVTCHNOP_BIND_VIRQ, "EVTCHNOP_bind_virq");
    constant!(c, nr::EVTCHNOP_UNMASK, "EVTCHNOP_unmask");
    constant!(c, nr::VIRQ_TIMER, "VIRQ_TIMER");
    constant!(c, nr::VCPUOP_INITIALISE, "VCPUOP_initialise");
    constant!(c, nr::VCPUOP_UP, "VCPUOP_up");
    constant!(c, nr::VCPUOP_DOWN, "VCPUOP_down");
    constant!(c, nr::VCPUOP_IS_UP, "VCPUOP_is_up");
    constant!(c, nr::VCPUOP_GET_RUNSTATE_INFO, "VCPUOP_get_runstate_info");
    constant!(
        c,
        nr::VCPUOP_SET_PERIODIC_TIMER,
        "VCPUOP_set_periodic_timer"
    );
    constant!(
        c,
        nr::VCPUOP_STOP_PERIODIC_TIMER,
        "VCPUOP_stop_periodic_timer"
    );
    constant!(
        c,
        nr::VCPUOP_SET_SINGLESHOT_TIMER,
        "VCPUOP_set_singleshot_timer"
    );
    constant!(
        c,
        nr::VCPUOP_STOP_SINGLESHOT_TIMER,
        "VCPUOP_stop_singleshot_timer"
    );
    constant!(c, VcpuSetSingleshotTimer::FUTURE, "VCPU_SSHOTTMR_future");
    constant!(c, VcpuRunstateInfo::RUNNING, "RUNSTATE_running");
    constant!(c, VcpuRunstateInfo::RUNNABLE, "RUNSTATE_runnable");
    constant!(c, VcpuRunstateInfo::BLOCKED, "RUNSTATE_blocked");
    constant!(c, VcpuRunstateInfo::OFFLINE, "RUNSTATE_offline");
    constant!(c, nr::CALLBACKOP_REGISTER, "CALLBACKOP_register");
    constant!(c, CallbackType::EVENT.0, "CALLBACKTYPE_event");
    constant!(c, CallbackType::FAILSAFE.0, "CALLBACKTYPE_failsafe");
    constant!(c, CallbackType::SYSCALL.0, "CALLBACKTYPE_syscall");
    constant!(c, CallbackType::NMI.0, "CALLBACKTYPE_nmi");
    constant!(c, CALLBACKF_MASK_EVENTS, "CALLBACKF_mask_events");
    constant!(c, nr::UVMF_INVLPG, "UVMF_INVLPG");
    constant!(c, nr::UVMF_ALL, "UVMF_ALL");
    constant!(c, LEGACY_MAX_VCPUS, "XEN_LEGACY_MAX_VCPUS");
    // The lower-case spelling: 4.17 has both, 4.22 only this one.
    constant!(c, VcpuGuestContext::VGCF_I387_VALID, "VGCF_i387_valid");
    constant!(c, VcpuGuestContext::VGCF_IN_KERNEL, "VGCF_in_kernel");
    constant!(
        c,
        VcpuGuestContext::VGCF_FAILSAFE_DISABLES_EVENTS,
        "VGCF_failsafe_disables_events"
    );
    constant!(
        c,
        VcpuGuestContext::VGCF_SYSCALL_DISABLES_EVENTS,
        "VGCF_syscall_disables_events"
    );

    constant!(
        c,
        TrapInfo::DPL_MASK,
        "TI_GET_DPL(&(struct trap_info){ .flags = 0xff })"
    );
    constant!(
        c,
        TrapInfo::MASK_EVENTS,
        "TI_GET_IF(&(struct trap_info){ .flags = 0xff })"
    );
    // XENPMU.
    constant!(c, XenPmuOp::MODE_GET.0, "XENPMU_mode_get");
    constant!(c, XenPmuOp::MODE_SET.0, "XENPMU_mode_set");
    constant!(c, XenPmuOp::FEATURE_GET.0, "XENPMU_feature_get");
    constant!(c, XenPmuOp::FEATURE_SET.0, "XENPMU_feature_set");
    constant!(c, XenPmuOp::INIT.0, "XENPMU_init");
    constant!(c, XenPmuOp::FINISH.0, "XENPMU_finish");
    constant!(c, XenPmuOp::LVTPC_SET.0, "XENPMU_lvtpc_set");
    constant!(c, XenPmuOp::FLUSH.0, "XENPMU_flush");
    constant!(c, nr::XENPMU_VER_MAJ, "XENPMU_VER_MAJ");
    constant!(c, nr::XENPMU_VER_MIN, "XENPMU_VER_MIN");
    constant!(c, XenPmuMode::OFF.bits(), "XENPMU_MODE_OFF");
    constant!(c, XenPmuMode::SELF.bits(), "XENPMU_MODE_SELF");
    constant!(c, XenPmuMode::HV.bits(), "XENPMU_MODE_HV");
    constant!(c, XenPmuMode::ALL.bits(), "XENPMU_MODE_ALL");
    constant!(
        c,
        XenPmuFeature::INTEL_BTS.bits(),
        "XENPMU_FEATURE_INTEL_BTS"
    );
    constant!(c, XenPmuFeature::IPC_ONLY.bits(), "XENPMU_FEATURE_IPC_ONLY");
    constant!(
        c,
        XenPmuFeature::ARCH_ONLY.bits(),
        "XENPMU_FEATURE_ARCH_ONLY"
    );
    constant!(c, PmuFlags::CACHED.bits(), "PMU_CACHED");
    constant!(c, PmuFlags::SAMPLE_USER.bits(), "PMU_SAMPLE_USER");
    constant!(c, PmuFlags::SAMPLE_REAL.bits(), "PMU_SAMPLE_REAL");
    constant!(c, PmuFlags::SAMPLE_PV.bits(), "PMU_SAMPLE_PV");
    // start_info, domains, features, selectors.
    constant!(c, nr::SIF_PRIVILEGED, "SIF_PRIVILEGED");
    constant!(c, nr::SIF_INITDOMAIN, "SIF_INITDOMAIN");
    constant!(c, nr::SIF_MOD_START_PFN, "SIF_MOD_START_PFN");
    constant!(c, nr::DOMID_SELF, "DOMID_SELF");
    constant!(c, nr::XENFEAT_DOM0, "XENFEAT_dom0");
    constant!(c, nr::FLAT_KERNEL_CS, "FLAT_KERNEL_CS");
    constant!(c, nr::FLAT_KERNEL_SS, "FLAT_KERNEL_SS");
    // ELF notes.
    constant!(c, nr::XEN_ELFNOTE_ENTRY, "XEN_ELFNOTE_ENTRY");
    constant!(
        c,
        nr::XEN_ELFNOTE_HYPERCALL_PAGE,
        "XEN_ELFNOTE_HYPERCALL_PAGE"
    );
    constant!(c, nr::XEN_ELFNOTE_VIRT_BASE, "XEN_ELFNOTE_VIRT_BASE");
    constant!(c, nr::XEN_ELFNOTE_PADDR_OFFSET, "XEN_ELFNOTE_PADDR_OFFSET");
    constant!(c, nr::XEN_ELFNOTE_XEN_VERSION, "XEN_ELFNOTE_XEN_VERSION");
    constant!(c, nr::XEN_ELFNOTE_GUEST_OS, "XEN_ELFNOTE_GUEST_OS");
    constant!(
        c,
        nr::XEN_ELFNOTE_GUEST_VERSION,
        "XEN_ELFNOTE_GUEST_VERSION"
    );
    constant!(c, nr::XEN_ELFNOTE_LOADER, "XEN_ELFNOTE_LOADER");
    constant!(c, nr::XEN_ELFNOTE_PAE_MODE, "XEN_ELFNOTE_PAE_MODE");
    constant!(c, nr::XEN_ELFNOTE_FEATURES, "XEN_ELFNOTE_FEATURES");
    constant!(c, nr::XEN_ELFNOTE_HV_START_LOW, "XEN_ELFNOTE_HV_START_LOW");
    constant!(c, nr::XEN_ELFNOTE_L1_MFN_VALID, "XEN_ELFNOTE_L1_MFN_VALID");
    constant!(
        c,
        nr::XEN_ELFNOTE_SUSPEND_CANCEL,
        "XEN_ELFNOTE_SUSPEND_CANCEL"
    );
    constant!(c, nr::XEN_ELFNOTE_INIT_P2M, "XEN_ELFNOTE_INIT_P2M");
    constant!(
        c,
        nr::XEN_ELFNOTE_MOD_START_PFN,
        "XEN_ELFNOTE_MOD_START_PFN"
    );
    constant!(
        c,
        nr::XEN_ELFNOTE_SUPPORTED_FEATURES,
        "XEN_ELFNOTE_SUPPORTED_FEATURES"
    );
    // Error numbers (xen/errno.h), each `Errno` constant against its XEN_ twin.
    macro_rules! errnos {
        ($($name:ident)*) => {
            $(c.add(
                concat!("Errno::", stringify!($name)),
                Errno::$name.0 as u64,
                concat!("XEN_", stringify!($name)),
            );)*
        };
    }
    errnos! {
        EPERM ENOENT ESRCH EIO ENXIO E2BIG ENOEXEC EBADF ECHILD EAGAIN ENOMEM
        EACCES EFAULT EBUSY EEXIST EXDEV ENODEV EINVAL ENFILE EMFILE ENOSPC EMLINK EDOM
        ERANGE EDEADLK ENAMETOOLONG ENOLCK ENOSYS ENOTEMPTY ENODATA ETIME EBADMSG
        EOVERFLOW EILSEQ ENOTSOCK EMSGSIZE EOPNOTSUPP EADDRINUSE EADDRNOTAVAIL
        ENOBUFS EISCONN ENOTCONN ETIMEDOUT ECONNREFUSED
    }
    // EINTR and ERESTART are Xen-internal (listed only under `__XEN__`, never returned
    // to a guest); `c_program` expands the list a second time with `__XEN__` defined
    // into an enum of `XEN_INTERNAL_*` values to check them too.
    c.add("Errno::EINTR", Errno::EINTR.0 as u64, "XEN_INTERNAL_EINTR");
    c.add(
        "Errno::ERESTART",
        Errno::ERESTART.0 as u64,
        "XEN_INTERNAL_ERESTART",
    );
    c
}

const HEADERS: &[&str] = &[
    "xen/xen.h",
    "xen/pmu.h",
    "xen/arch-x86/pmu.h",
    "xen/io/console.h",
    "xen/io/xs_wire.h",
    "xen/sched.h",
    "xen/event_channel.h",
    "xen/physdev.h",
    "xen/vcpu.h",
    "xen/callback.h",
    "xen/version.h",
    "xen/features.h",
    "xen/elfnote.h",
    "xen/errno.h",
];

fn c_program(checks: &Checks) -> String {
    // Without an interface version the headers default to 0 and give the pre-3.1
    // (compat) numbers for sched_op, event_channel_op and physdev_op; a guest built today
    // speaks the latest interface, so ask for it. (Macros expand lazily, so naming the
    // header's own `__XEN_LATEST_INTERFACE_VERSION__` before it is defined works.)
    let mut src = String::from(concat!(
        "#define __XEN_INTERFACE_VERSION__ __XEN_LATEST_INTERFACE_VERSION__\n",
        "#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n",
    ));
    for h in HEADERS {
        writeln!(src, "#include <{h}>").unwrap();
    }
    // The errno list once more, Xen-internal codes included, as `XEN_INTERNAL_*`.
    src.push_str(concat!(
        "#define __XEN__\n",
        "#define XEN_ERRNO(name, value) XEN_INTERNAL_##name = value,\n",
        "enum xen_internal_errno {\n",
        "#include <xen/errno.h>\n",
        "};\n",
        "#undef __XEN__\n",
    ));
    // What every release's console ring shares: up to the `connection` byte that 4.19
    // appended (the header defines its values next to it), else the whole struct.
    src.push_str(concat!(
        "#ifdef XENCONSOLE_CONNECTED\n",
        "#define XENMSR_XENCONS_SHARED_SIZE offsetof(struct xencons_interface, connection)\n",
        "#else\n",
        "#define XENMSR_XENCONS_SHARED_SIZE sizeof(struct xencons_interface)\n",
        "#endif\n",
    ));
    src.push_str("int main(void)\n{\n");
    for (i, check) in checks.0.iter().enumerate() {
        writeln!(
            src,
            "    printf(\"%d %llu\\n\", {i}, (unsigned long long)({}));",
            check.c_expr
        )
        .unwrap();
    }
    src.push_str("    return 0;\n}\n");
    src
}

/// Compiles and runs the program for `checks`; returns the mismatch report lines.
fn run_against_headers(name: &str, checks: &Checks) -> Vec<String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("layout_vs_xen_headers");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&src, c_program(checks)).unwrap();
    // Warnings are errors so a header surprise does not go unnoticed.
    let mut gcc = Command::new("gcc");
    if let Some(include) = other_headers() {
        // Another release's public headers, laid out as `<dir>/xen/*.h`, searched before
        // the system's.
        gcc.arg("-I").arg(include);
    }
    let out = gcc
        .args(["-std=gnu11", "-O0", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("running gcc (install it with `apt-get install -y gcc`)");
    assert!(
        out.status.success(),
        "gcc failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .output()
        .expect("running the layout program");
    assert!(run.status.success(), "{} failed", exe.display());
    let stdout = String::from_utf8(run.stdout).unwrap();
    let mut values = vec![None; checks.0.len()];
    for line in stdout.lines() {
        let (i, v) = line.split_once(' ').expect("`index value` lines");
        values[i.parse::<usize>().unwrap()] = Some(v.parse::<u64>().unwrap());
    }
    let mut mismatches = Vec::new();
    for (check, c) in checks.0.iter().zip(values) {
        let c = c.expect("every check printed");
        if c != check.rust {
            mismatches.push(format!(
                "{} = {} but C {} = {}",
                check.rust_what, check.rust, check.c_expr, c
            ));
        }
    }
    mismatches
}

/// Installs Debian's `libxen-dev` (and gcc) if the headers are missing, once per process
/// (both tests of this file may ask at the same time).
fn install_headers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!("/usr/include/xen/xen.h is missing: installing libxen-dev (apt-get)");
        for args in [
            &["update", "-qq"][..],
            &[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "libxen-dev",
                "gcc",
            ][..],
        ] {
            let status = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("apt-get {args:?} failed: {status:?}");
                return;
            }
        }
    });
}

/// `XENMSR_XEN_INCLUDE`: a directory holding another Xen release's public headers as
/// `xen/*.h` (`cargo xtask test` points it at Xen 4.22.0's, taken from its source), to
/// check the same layouts and constants against that release instead of Debian's.
fn other_headers() -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(std::env::var_os("XENMSR_XEN_INCLUDE")?);
    assert!(
        dir.join("xen").join("xen.h").is_file(),
        "XENMSR_XEN_INCLUDE={} has no xen/xen.h",
        dir.display()
    );
    Some(dir)
}

fn headers_present() -> bool {
    if let Some(dir) = other_headers() {
        println!("checking against the headers in {}", dir.display());
        return true;
    }
    if Path::new("/usr/include/xen/xen.h").exists() {
        return true;
    }
    if std::env::var_os("XENMSR_SKIP_XEN_HEADERS").is_some() {
        eprintln!("XENMSR_SKIP_XEN_HEADERS set and /usr/include/xen missing: check skipped");
        return false;
    }
    install_headers();
    if Path::new("/usr/include/xen/xen.h").exists() {
        return true;
    }
    panic!(
        "/usr/include/xen/xen.h is missing and installing libxen-dev failed: install it with \
         `apt-get update && apt-get install -y libxen-dev` (or set \
         XENMSR_SKIP_XEN_HEADERS=1 to skip this check)"
    );
}

#[test]
fn struct_layouts_match_xen_headers() {
    if !headers_present() {
        return;
    }
    let checks = layout_checks();
    let mismatches = run_against_headers("layout", &checks);
    assert!(
        mismatches.is_empty(),
        "{} of {} layout values differ from the Xen headers:\n  {}",
        mismatches.len(),
        checks.0.len(),
        mismatches.join("\n  ")
    );
    // Print what was verified (visible with --nocapture).
    for check in checks
        .0
        .iter()
        .filter(|c| c.rust_what.starts_with("size_of::<"))
    {
        println!(
            "{} = {} (== C {})",
            check.rust_what, check.rust, check.c_expr
        );
    }
    println!("{} layout values verified", checks.0.len());
}

#[test]
fn constants_match_xen_headers() {
    if !headers_present() {
        return;
    }
    let checks = constant_checks();
    let mismatches = run_against_headers("constants", &checks);
    assert!(
        mismatches.is_empty(),
        "{} of {} constants differ from the Xen headers:\n  {}",
        mismatches.len(),
        checks.0.len(),
        mismatches.join("\n  ")
    );
    println!("{} constants verified", checks.0.len());
}
