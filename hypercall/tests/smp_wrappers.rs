//! The SMP, event and time wrappers against the mock page: the hypercall number and
//! sub-op, the arguments in the right registers, the structs behind pointer arguments
//! (read, and for the "out" ones written, during the call), and the decoded results.
#![cfg(feature = "mock")]

use xenmsr_hypercall::abi::{
    CallbackRegister, CallbackType, EvtchnBindVirq, EvtchnUnmask, TrapInfo, VcpuGuestContext,
    VcpuRunstateInfo, VcpuSetSingleshotTimer,
};
use xenmsr_hypercall::mock;
use xenmsr_hypercall::{Errno, HypercallPage, nr};

fn page() -> HypercallPage {
    mock::page()
}

/// The one call made since the last `take_calls`: its number and arguments.
fn only_call() -> (u32, [u64; 5]) {
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    (calls[0].nr, calls[0].args)
}

/// Every error Xen can answer comes back as that `Errno`; 0 is success.
fn check_errors<T: std::fmt::Debug>(nr: u32, mut f: impl FnMut() -> Result<T, Errno>) {
    for errno in [
        Errno::EINVAL,
        Errno::ENOENT,
        Errno::EEXIST,
        Errno::ETIME,
        Errno(4095),
    ] {
        mock::script_err(nr, errno);
        assert_eq!(f().unwrap_err(), errno);
        mock::take_calls();
    }
    mock::script(nr, 0);
    assert!(f().is_ok());
    mock::take_calls();
}

#[test]
fn vcpu_initialise_passes_the_context() {
    let _m = mock::session();
    let mut ctx = VcpuGuestContext::zeroed();
    ctx.flags = VcpuGuestContext::VGCF_IN_KERNEL;
    ctx.user_regs.rip = 0x10_2000;
    ctx.user_regs.rsp = 0x20_0000;
    ctx.trap_ctxt[13] = TrapInfo::new(13, 0, true, 0x10_3000);
    ctx.ctrlreg[3] = 0x1234_5000;
    ctx.event_callback_eip = 0x10_4000;
    let want = ctx;
    mock::on(nr::VCPU_OP, move |args| {
        assert_eq!(args[0], u64::from(nr::VCPUOP_INITIALISE));
        assert_eq!(args[1], 3);
        assert_eq!(args[3..], [0, 0]);
        // SAFETY: the wrapper passes the address of the borrowed context.
        let seen = unsafe { (args[2] as *const VcpuGuestContext).read() };
        assert_eq!(seen, want);
        0
    });
    // SAFETY: the mock page never starts a vCPU.
    unsafe { page().vcpu_initialise(3, &ctx) }.unwrap();
    assert_eq!(only_call().0, nr::VCPU_OP);
    // SAFETY: as above.
    check_errors(nr::VCPU_OP, || unsafe { page().vcpu_initialise(1, &ctx) });
}

#[test]
fn vcpu_up_is_up_and_stop_periodic_name_the_vcpu() {
    let _m = mock::session();
    // SAFETY: the mock page never starts a vCPU.
    unsafe { page().vcpu_up(2) }.unwrap();
    assert_eq!(
        only_call(),
        (nr::VCPU_OP, [u64::from(nr::VCPUOP_UP), 2, 0, 0, 0])
    );
    for (ret, up) in [(0, false), (1, true)] {
        mock::script(nr::VCPU_OP, ret);
        assert_eq!(page().vcpu_is_up(7), Ok(up));
        assert_eq!(
            only_call(),
            (nr::VCPU_OP, [u64::from(nr::VCPUOP_IS_UP), 7, 0, 0, 0])
        );
    }
    page().vcpu_stop_periodic_timer(5).unwrap();
    assert_eq!(
        only_call(),
        (
            nr::VCPU_OP,
            [u64::from(nr::VCPUOP_STOP_PERIODIC_TIMER), 5, 0, 0, 0]
        )
    );
    // SAFETY: as above.
    check_errors(nr::VCPU_OP, || unsafe { page().vcpu_up(1) });
    check_errors(nr::VCPU_OP, || page().vcpu_is_up(1));
    check_errors(nr::VCPU_OP, || page().vcpu_stop_periodic_timer(1));
}

#[test]
fn singleshot_timer_passes_timeout_and_flags() {
    let _m = mock::session();
    mock::on(nr::VCPU_OP, |args| {
        assert_eq!(args[0], u64::from(nr::VCPUOP_SET_SINGLESHOT_TIMER));
        assert_eq!(args[1], 1);
        // SAFETY: the wrapper passes the address of the argument on its stack.
        let arg = unsafe { (args[2] as *const VcpuSetSingleshotTimer).read() };
        assert_eq!(arg.timeout_abs_ns, 123_456_789_000);
        assert_eq!(arg.flags, VcpuSetSingleshotTimer::FUTURE);
        0
    });
    page()
        .vcpu_set_singleshot_timer(1, 123_456_789_000, VcpuSetSingleshotTimer::FUTURE)
        .unwrap();
    only_call();
    check_errors(nr::VCPU_OP, || page().vcpu_set_singleshot_timer(0, 1, 0));
}

#[test]
fn runstate_info_is_copied_out() {
    let _m = mock::session();
    mock::on(nr::VCPU_OP, |args| {
        assert_eq!(args[0], u64::from(nr::VCPUOP_GET_RUNSTATE_INFO));
        assert_eq!(args[1], 2);
        let info = VcpuRunstateInfo {
            state: 1,
            pad: 0,
            state_entry_time: 99,
            time: [10, 20, 30, 40],
        };
        // SAFETY: the wrapper passes the address of a `VcpuRunstateInfo` it owns.
        unsafe { (args[2] as *mut VcpuRunstateInfo).write(info) };
        0
    });
    let info = page().vcpu_runstate_info(2).unwrap();
    assert_eq!(
        (info.state, info.state_entry_time, info.time),
        (1, 99, [10, 20, 30, 40])
    );
    only_call();
    check_errors(nr::VCPU_OP, || page().vcpu_runstate_info(0));
}

#[test]
fn bind_virq_returns_the_port() {
    let _m = mock::session();
    mock::on(nr::EVENT_CHANNEL_OP, |args| {
        assert_eq!(args[0], u64::from(nr::EVTCHNOP_BIND_VIRQ));
        assert_eq!(args[2..], [0, 0, 0]);
        let p = args[1] as *mut EvtchnBindVirq;
        // SAFETY: the wrapper passes the address of its argument, for Xen to fill.
        let arg = unsafe { p.read() };
        assert_eq!((arg.virq, arg.vcpu), (nr::VIRQ_TIMER, 3));
        // SAFETY: as above.
        unsafe { (*p).port = 41 };
        0
    });
    assert_eq!(page().evtchn_bind_virq(nr::VIRQ_TIMER, 3), Ok(41));
    only_call();
    check_errors(nr::EVENT_CHANNEL_OP, || page().evtchn_bind_virq(0, 0));
}

#[test]
fn sched_poll_passes_ports_and_timeout() {
    let _m = mock::session();
    let ports = [7u32, 9];
    let addr = ports.as_ptr() as u64;
    mock::on(nr::SCHED_OP, move |args| {
        assert_eq!(args[0], u64::from(nr::SCHEDOP_POLL));
        // SAFETY: the wrapper passes the address of its argument.
        let arg = unsafe { (args[1] as *const xenmsr_hypercall::abi::SchedPoll).read() };
        assert_eq!((arg.ports, arg.nr_ports, arg.timeout), (addr, 2, 555));
        // SAFETY: `ports` points at the caller's two ports.
        let seen = unsafe { std::slice::from_raw_parts(arg.ports as *const u32, 2) };
        assert_eq!(seen, [7, 9]);
        0
    });
    page().sched_poll(&ports, 555).unwrap();
    only_call();
    check_errors(nr::SCHED_OP, || page().sched_poll(&[], 0));
}

#[test]
fn unmask_passes_the_port() {
    let _m = mock::session();
    mock::on(nr::EVENT_CHANNEL_OP, |args| {
        assert_eq!(args[0], u64::from(nr::EVTCHNOP_UNMASK));
        // SAFETY: the wrapper passes the address of its argument.
        let arg = unsafe { (args[1] as *const EvtchnUnmask).read() };
        assert_eq!(arg.port, 9);
        0
    });
    page().evtchn_unmask(9).unwrap();
    only_call();
    check_errors(nr::EVENT_CHANNEL_OP, || page().evtchn_unmask(1));
}

#[test]
fn callback_register_passes_kind_flags_address() {
    let _m = mock::session();
    mock::on(nr::CALLBACK_OP, |args| {
        assert_eq!(args[0], u64::from(nr::CALLBACKOP_REGISTER));
        // SAFETY: the wrapper passes the address of its argument.
        let arg = unsafe { (args[1] as *const CallbackRegister).read() };
        assert_eq!((arg.kind, arg.flags, arg.address), (0, 1, 0x10_5000));
        0
    });
    // SAFETY: the mock page never calls the address.
    unsafe { page().callback_register(CallbackType::EVENT, 0x10_5000, 1) }.unwrap();
    only_call();
    // SAFETY: as above.
    check_errors(nr::CALLBACK_OP, || unsafe {
        page().callback_register(CallbackType::FAILSAFE, 0x10_6000, 0)
    });
}

#[test]
fn update_va_mapping_and_xen_version_registers() {
    let _m = mock::session();
    // SAFETY: the mock page maps nothing.
    unsafe { page().update_va_mapping(0x20_0000, 0xabc_d063, nr::UVMF_INVLPG) }.unwrap();
    assert_eq!(
        only_call(),
        (nr::UPDATE_VA_MAPPING, [0x20_0000, 0xabc_d063, 2, 0, 0])
    );
    mock::script(nr::XEN_VERSION, 4 << 16 | 17);
    assert_eq!(page().xen_version(), Ok((4, 17)));
    assert_eq!(
        only_call(),
        (nr::XEN_VERSION, [u64::from(nr::XENVER_VERSION), 0, 0, 0, 0])
    );
    // SAFETY: as above.
    check_errors(nr::UPDATE_VA_MAPPING, || unsafe {
        page().update_va_mapping(0, 0, 0)
    });
    check_errors(nr::XEN_VERSION, || page().xen_version());
}

#[test]
fn pvclock_scales_the_tsc_delta() {
    use xenmsr_hypercall::abi::VcpuTimeInfo;
    // 2 GHz TSC: 0.5 ns per tick = mul 2^31 with no shift.
    let t = VcpuTimeInfo {
        tsc_timestamp: 1_000,
        system_time: 5_000_000,
        tsc_to_system_mul: 1 << 31,
        tsc_shift: 0,
        ..VcpuTimeInfo::default()
    };
    assert_eq!(t.system_time_at(1_000), 5_000_000);
    assert_eq!(t.system_time_at(3_000), 5_001_000);
    // A negative shift halves the delta first; a positive one doubles it.
    let halved = VcpuTimeInfo { tsc_shift: -1, ..t };
    assert_eq!(halved.system_time_at(5_000), 5_001_000);
    let doubled = VcpuTimeInfo { tsc_shift: 1, ..t };
    assert_eq!(doubled.system_time_at(2_000), 5_001_000);
    // Large deltas do not overflow the intermediate product.
    let big = VcpuTimeInfo {
        tsc_to_system_mul: u32::MAX,
        ..t
    };
    assert_eq!(
        big.system_time_at(1_000 + (1 << 40)),
        5_000_000 + ((u128::from(1u64 << 40) * u128::from(u32::MAX)) >> 32) as u64
    );
}
