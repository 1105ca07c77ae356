//! Every typed wrapper against the mock page: the hypercall number, the arguments in the
//! right registers (and the structs behind pointer arguments, read during the call), and
//! Xen's result decoded (0, a positive value, every errno).
#![cfg(feature = "mock")]

use std::cell::RefCell;
use std::rc::Rc;

use xenmsr_hypercall::abi::{
    EvtchnSend, MulticallEntry, PhysdevSetIopl, SchedShutdown, SegmentBase, ShutdownReason,
    TrapInfo, XenPmuMode, XenPmuOp, XenPmuParams,
};
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::{Errno, HypercallPage, nr};

/// Errors Xen really returns from these calls, plus others and one it never defines.
const ERRNOS: &[Errno] = &[
    Errno::EPERM,
    Errno::ENOENT,
    Errno::ESRCH,
    Errno::EIO,
    Errno::EAGAIN,
    Errno::ENOMEM,
    Errno::EACCES,
    Errno::EFAULT,
    Errno::EBUSY,
    Errno::EEXIST,
    Errno::ENODEV,
    Errno::EINVAL,
    Errno::ENOSPC,
    Errno::ERANGE,
    Errno::ENOSYS,
    Errno::ERESTART,
    Errno::EOPNOTSUPP,
    Errno(4000),
    Errno(4095),
];

/// Scripts `ret` for `nr`, runs `f`, and checks exactly one call of `nr` was made.
fn one_call<T>(nr: u32, ret: i64, mut f: impl FnMut() -> T) -> T {
    mock::script(nr, ret);
    let out = f();
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].nr, nr, "{calls:?}");
    out
}

/// Checks the decoding of 0, positive values and every errno for a wrapper whose success
/// value is `()`.
fn check_unit_results(nr: u32, mut f: impl FnMut() -> Result<(), Errno>) {
    for ret in [0, 1, 0x7fff_ffff, i64::MAX, -4096, i64::MIN] {
        assert_eq!(one_call(nr, ret, &mut f), Ok(()), "raw result {ret}");
    }
    for &errno in ERRNOS {
        assert_eq!(
            one_call(nr, errno.to_ret(), &mut f),
            Err(errno),
            "{errno:?}"
        );
    }
}

/// Checks the decoding of 0, positive values and every errno for a wrapper that returns
/// Xen's value.
fn check_value_results(nr: u32, mut f: impl FnMut() -> Result<u64, Errno>) {
    for ret in [0, 1, 17, 0x7fff_ffff, i64::MAX] {
        assert_eq!(
            one_call(nr, ret, &mut f),
            Ok(ret as u64),
            "raw result {ret}"
        );
    }
    // Below the errno range, a negative rax is a value, not an error.
    assert_eq!(one_call(nr, -4096, &mut f), Ok(-4096i64 as u64));
    for &errno in ERRNOS {
        assert_eq!(
            one_call(nr, errno.to_ret(), &mut f),
            Err(errno),
            "{errno:?}"
        );
    }
}

/// Copies the `T` at address `addr`, as Xen would read a guest handle.
///
/// # Safety
///
/// `addr` must point to a live, aligned `T`.
unsafe fn read_arg<T: Copy>(addr: u64) -> T {
    // SAFETY: forwarded to the caller.
    unsafe { (addr as *const T).read() }
}

fn page() -> HypercallPage {
    mock::page()
}

#[test]
fn mock_page_looks_like_xens() {
    let _m = mock::session();
    let page = page();
    assert!(page.is_filled());
    for n in [0u32, 1, 23, 25, 40, 127] {
        // SAFETY: the entry lies within the readable mock page.
        let head = unsafe { std::slice::from_raw_parts(page.entry(n), 8) };
        let mut want = vec![0x51, 0x41, 0x53, 0xb8];
        want.extend_from_slice(&n.to_le_bytes());
        assert_eq!(head, &want[..], "entry {n}");
    }
}

#[test]
fn set_segment_base_registers() {
    let _m = mock::session();
    let cases = [
        (SegmentBase::FS, 0x7fff_f7fd_e740, 0),
        (SegmentBase::GS_USER, 0x1234_5000, 1),
        (SegmentBase::GS_KERNEL, 0xffff_8880_0000_0000, 2),
        (SegmentBase::GS_USER_SEL, 0x2b, 3),
    ];
    for (which, base, raw) in cases {
        set_base(page(), which, base).unwrap();
        mock::assert_calls(&[MockCall::new(25, [raw, base, 0, 0, 0])]);
    }
    // An unknown selector is passed through for Xen to reject.
    mock::script_err(nr::SET_SEGMENT_BASE, Errno::EINVAL);
    assert_eq!(set_base(page(), SegmentBase(99), 1), Err(Errno::EINVAL));
    mock::assert_calls(&[MockCall::new(25, [99, 1, 0, 0, 0])]);
}

#[test]
fn set_segment_base_results() {
    let _m = mock::session();
    check_unit_results(nr::SET_SEGMENT_BASE, || {
        set_base(page(), SegmentBase::FS, 0x1000)
    });
}

#[test]
fn xenpmu_op_passes_params_and_reads_them_back() {
    let _m = mock::session();
    mock::on(nr::XENPMU_OP, |args| {
        assert_eq!(args[0], u64::from(nr::XENPMU_MODE_GET));
        assert_eq!(args[2..], [0, 0, 0]);
        assert_ne!(args[1], 0);
        // SAFETY: the wrapper passes the address of the caller's `XenPmuParams`,
        // exclusively borrowed for the call.
        let params = unsafe { &mut *(args[1] as *mut XenPmuParams) };
        assert_eq!(
            *params,
            XenPmuParams {
                version_maj: 0,
                version_min: 1,
                val: 0,
                vcpu: 3,
                pad: 0
            }
        );
        params.val = XenPmuMode::SELF.bits();
        0
    });
    let mut params = XenPmuParams::new(0, 3);
    // SAFETY: MODE_GET only reads and writes `params`.
    let ret = unsafe { page().xenpmu_op(XenPmuOp::MODE_GET, Some(&mut params)) };
    assert_eq!(ret, Ok(0));
    assert_eq!(params.val, XenPmuMode::SELF.bits());
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].nr, 40);
    assert_eq!(calls[0].args[1], std::ptr::from_mut(&mut params) as u64);
}

#[test]
fn xenpmu_op_init_carries_mfn_and_vcpu() {
    let _m = mock::session();
    let seen = Rc::new(RefCell::new(None));
    let seen2 = Rc::clone(&seen);
    mock::on(nr::XENPMU_OP, move |args| {
        // SAFETY: the wrapper passes the address of the caller's `XenPmuParams`.
        let params: XenPmuParams = unsafe { read_arg(args[1]) };
        *seen2.borrow_mut() = Some((args[0], params));
        0
    });
    let mut params = XenPmuParams::new(0x1_2345, 7);
    // SAFETY: the mock does not map the MFN; nothing writes outside `params`.
    unsafe { page().xenpmu_op(XenPmuOp::INIT, Some(&mut params)) }.unwrap();
    let (op, got) = seen.borrow_mut().take().expect("handler ran");
    assert_eq!(op, 4);
    assert_eq!(
        got,
        XenPmuParams {
            version_maj: 0,
            version_min: 1,
            val: 0x1_2345,
            vcpu: 7,
            pad: 0
        }
    );
    mock::take_calls();
}

#[test]
fn xenpmu_op_none_passes_null() {
    let _m = mock::session();
    for (op, raw) in [(XenPmuOp::FLUSH, 7), (XenPmuOp::LVTPC_SET, 6)] {
        // SAFETY: FLUSH and LVTPC_SET act only on the registered page; the mock has none.
        unsafe { page().xenpmu_op(op, None) }.unwrap();
        mock::assert_calls(&[MockCall::new(40, [raw, 0, 0, 0, 0])]);
    }
}

#[test]
fn xenpmu_op_every_op_number() {
    let _m = mock::session();
    let ops = [
        XenPmuOp::MODE_GET,
        XenPmuOp::MODE_SET,
        XenPmuOp::FEATURE_GET,
        XenPmuOp::FEATURE_SET,
        XenPmuOp::INIT,
        XenPmuOp::FINISH,
        XenPmuOp::LVTPC_SET,
        XenPmuOp::FLUSH,
    ];
    for (i, op) in ops.into_iter().enumerate() {
        // SAFETY: the mock touches nothing.
        unsafe { page().xenpmu_op(op, None) }.unwrap();
        mock::assert_calls(&[MockCall::new(40, [i as u64, 0, 0, 0, 0])]);
    }
}

#[test]
fn xenpmu_op_results() {
    let _m = mock::session();
    check_value_results(nr::XENPMU_OP, || {
        let mut params = XenPmuParams::new(0, 0);
        // SAFETY: the mock touches nothing but `params`.
        unsafe { page().xenpmu_op(XenPmuOp::MODE_GET, Some(&mut params)) }
    });
}

#[test]
fn console_write_registers_and_buffer() {
    let _m = mock::session();
    let text = b"hello from the PV kernel\n";
    let seen = Rc::new(RefCell::new(Vec::new()));
    let seen2 = Rc::clone(&seen);
    mock::on(nr::CONSOLE_IO, move |args| {
        assert_eq!(args[0], u64::from(nr::CONSOLEIO_WRITE));
        assert_eq!(args[3..], [0, 0]);
        // SAFETY: the wrapper passes (len, ptr) of a borrowed byte slice.
        let bytes = unsafe { std::slice::from_raw_parts(args[2] as *const u8, args[1] as usize) };
        seen2.borrow_mut().extend_from_slice(bytes);
        0
    });
    assert_eq!(page().console_write(text), Ok(0));
    assert_eq!(&seen.borrow()[..], text);
    mock::assert_calls(&[MockCall::new(
        18,
        [0, text.len() as u64, text.as_ptr() as u64, 0, 0],
    )]);

    // An empty write still calls, with length 0.
    page().console_write(&[]).unwrap();
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].nr, calls[0].args[0], calls[0].args[1]),
        (18, 0, 0)
    );
}

#[test]
fn console_write_results() {
    let _m = mock::session();
    check_value_results(nr::CONSOLE_IO, || page().console_write(b"x"));
}

#[test]
fn sched_shutdown_every_reason() {
    let _m = mock::session();
    let reasons = [
        (ShutdownReason::POWEROFF, 0),
        (ShutdownReason::REBOOT, 1),
        (ShutdownReason::SUSPEND, 2),
        (ShutdownReason::CRASH, 3),
        (ShutdownReason::WATCHDOG, 4),
        (ShutdownReason::SOFT_RESET, 5),
    ];
    for (reason, raw) in reasons {
        mock::on(nr::SCHED_OP, move |args| {
            assert_eq!(args[0], u64::from(nr::SCHEDOP_SHUTDOWN));
            assert_eq!(args[2..], [0, 0, 0]);
            // SAFETY: the wrapper passes the address of a `SchedShutdown` on its stack.
            let arg: SchedShutdown = unsafe { read_arg(args[1]) };
            assert_eq!(arg.reason, raw);
            0
        });
        page().sched_shutdown(reason).unwrap();
        let calls = mock::take_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!((calls[0].nr, calls[0].args[0]), (29, 2));
    }
}

#[test]
fn sched_shutdown_results() {
    let _m = mock::session();
    check_unit_results(nr::SCHED_OP, || {
        page().sched_shutdown(ShutdownReason::SUSPEND)
    });
}

#[test]
fn xen_version_registers_and_results() {
    let _m = mock::session();
    mock::script(nr::XEN_VERSION, 0x0004_0014);
    assert_eq!(page().xen_version(), Ok((4, 20)));
    mock::assert_calls(&[MockCall::new(17, [0, 0, 0, 0, 0])]);
    // The major version is the high half, the minor the low half.
    for (ret, want) in [
        (0, (0, 0)),
        (0x0004_0011, (4, 17)),
        (0x0003_0000, (3, 0)),
        (0x0001_ffff, (1, 0xffff)),
        (0xffff_0001, (0xffff, 1)),
    ] {
        assert_eq!(
            one_call(nr::XEN_VERSION, ret, || page().xen_version()),
            Ok(want),
            "raw result {ret:#x}"
        );
    }
    for &errno in ERRNOS {
        assert_eq!(
            one_call(nr::XEN_VERSION, errno.to_ret(), || page().xen_version()),
            Err(errno),
            "{errno:?}"
        );
    }
}

#[test]
fn sched_yield_registers_and_results() {
    let _m = mock::session();
    page().sched_yield().unwrap();
    mock::assert_calls(&[MockCall::new(29, [0, 0, 0, 0, 0])]);
    check_unit_results(nr::SCHED_OP, || page().sched_yield());
}

#[test]
fn set_trap_table_requires_terminator() {
    let _m = mock::session();
    let handler = TrapInfo::new(13, 0, false, 0xffff_8000_0010_0000);
    // SAFETY: rejected before any call is made.
    assert_eq!(unsafe { page().set_trap_table(&[]) }, Err(Errno::EINVAL));
    // SAFETY: rejected before any call is made.
    let ret = unsafe { page().set_trap_table(&[handler]) };
    assert_eq!(ret, Err(Errno::EINVAL));
    mock::assert_calls(&[]);
}

#[test]
fn set_trap_table_passes_the_table() {
    let _m = mock::session();
    let table = [
        TrapInfo::new(6, 0, false, 0xffff_8000_0010_0000),
        TrapInfo::new(13, 0, true, 0xffff_8000_0010_0040),
        TrapInfo::new(3, 3, false, 0xffff_8000_0010_0080),
        TrapInfo::TERMINATOR,
    ];
    let seen = Rc::new(RefCell::new(Vec::new()));
    let seen2 = Rc::clone(&seen);
    mock::on(nr::SET_TRAP_TABLE, move |args| {
        assert_eq!(args[1..], [0, 0, 0, 0]);
        // Read up to the terminator, as Xen does.
        let mut p = args[0] as *const TrapInfo;
        loop {
            // SAFETY: the wrapper checked the table ends with a terminator, so every
            // entry up to it is within the borrowed slice.
            let entry = unsafe { p.read() };
            seen2.borrow_mut().push(entry);
            if entry.address == 0 {
                break;
            }
            p = p.wrapping_add(1);
        }
        0
    });
    // SAFETY: the mock installs nothing.
    unsafe { page().set_trap_table(&table) }.unwrap();
    assert_eq!(&seen.borrow()[..], &table[..]);
    assert_eq!(table[1].flags, 4);
    assert_eq!(table[2].flags, 3);
    assert_eq!(table[0].cs, 0xe033);
    mock::assert_calls(&[MockCall::new(0, [table.as_ptr() as u64, 0, 0, 0, 0])]);
}

#[test]
fn set_trap_table_results() {
    let _m = mock::session();
    let table = [TrapInfo::TERMINATOR];
    // SAFETY: the mock installs nothing.
    check_unit_results(nr::SET_TRAP_TABLE, || unsafe {
        page().set_trap_table(&table)
    });
}

#[test]
fn physdev_set_iopl_registers() {
    let _m = mock::session();
    for iopl in [0u32, 1, 3] {
        mock::on(nr::PHYSDEV_OP, move |args| {
            assert_eq!(args[0], 6);
            assert_eq!(args[2..], [0, 0, 0]);
            // SAFETY: the wrapper passes the address of a `PhysdevSetIopl` on its stack.
            let arg: PhysdevSetIopl = unsafe { read_arg(args[1]) };
            assert_eq!(arg.iopl, iopl);
            0
        });
        page().physdev_set_iopl(iopl).unwrap();
        let calls = mock::take_calls();
        assert_eq!((calls.len(), calls[0].nr, calls[0].args[0]), (1, 33, 6));
    }
}

#[test]
fn physdev_set_iopl_results() {
    let _m = mock::session();
    check_unit_results(nr::PHYSDEV_OP, || page().physdev_set_iopl(1));
}

#[test]
fn evtchn_send_registers() {
    let _m = mock::session();
    for port in [0u32, 1, 4095, u32::MAX] {
        mock::on(nr::EVENT_CHANNEL_OP, move |args| {
            assert_eq!(args[0], 4);
            assert_eq!(args[2..], [0, 0, 0]);
            // SAFETY: the wrapper passes the address of an `EvtchnSend` on its stack.
            let arg: EvtchnSend = unsafe { read_arg(args[1]) };
            assert_eq!(arg.port, port);
            0
        });
        page().evtchn_send(port).unwrap();
        let calls = mock::take_calls();
        assert_eq!((calls.len(), calls[0].nr, calls[0].args[0]), (1, 32, 4));
    }
}

#[test]
fn evtchn_send_results() {
    let _m = mock::session();
    check_unit_results(nr::EVENT_CHANNEL_OP, || page().evtchn_send(2));
}

#[test]
fn multicall_passes_the_batch_and_gets_results() {
    let _m = mock::session();
    let mut batch = [
        MulticallEntry {
            op: u64::from(nr::SCHED_OP),
            result: 0,
            args: [0, 0, 0, 0, 0, 0],
        },
        MulticallEntry {
            op: u64::from(nr::SET_SEGMENT_BASE),
            result: 0,
            args: [0, 0x1000, 0, 0, 0, 0],
        },
    ];
    let expected = batch;
    mock::on(nr::MULTICALL, move |args| {
        assert_eq!(args[1], 2);
        assert_eq!(args[2..], [0, 0, 0]);
        // SAFETY: the wrapper passes (ptr, len) of an exclusively borrowed slice.
        let entries = unsafe { std::slice::from_raw_parts_mut(args[0] as *mut MulticallEntry, 2) };
        assert_eq!(entries, &expected[..]);
        entries[0].result = 0;
        entries[1].result = Errno::EINVAL.to_ret() as u64;
        0
    });
    // SAFETY: the mock runs none of the batched calls.
    unsafe { page().multicall(&mut batch) }.unwrap();
    assert_eq!(batch[0].result, 0);
    assert_eq!(Errno::from_ret(batch[1].result as i64), Err(Errno::EINVAL));
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].nr, 13);
    assert_eq!(calls[0].args[..2], [batch.as_ptr() as u64, 2]);
}

#[test]
fn multicall_results() {
    let _m = mock::session();
    let mut batch = [MulticallEntry::default()];
    // SAFETY: the mock runs none of the batched calls.
    check_unit_results(nr::MULTICALL, || unsafe { page().multicall(&mut batch) });
}

#[test]
fn raw_results_decode_at_the_errno_boundary() {
    assert_eq!(Errno::from_ret(0), Ok(0));
    assert_eq!(Errno::from_ret(-1), Err(Errno::EPERM));
    assert_eq!(Errno::from_ret(-4095), Err(Errno(4095)));
    assert_eq!(Errno::from_ret(-4096), Ok(-4096i64 as u64));
    assert_eq!(Errno::EOPNOTSUPP.to_ret(), -95);
}

/// `set_segment_base` on the mock page, which records the call and changes no segment
/// base.
fn set_base(page: HypercallPage, which: SegmentBase, base: u64) -> Result<(), Errno> {
    // SAFETY: the mock page only records the call.
    unsafe { page.set_segment_base(which, base) }
}
