//! The mock's own behaviour: defaults, ordering of scripts and handlers, the diff of
//! `assert_calls`, and what happens to a panicking handler or an unused script.
#![cfg(feature = "mock")]

use std::panic::{AssertUnwindSafe, catch_unwind};

use xenmsr_hypercall::mock::{self, HANDLER_PANICKED, MockCall};
use xenmsr_hypercall::{Errno, nr};

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast::<&str>()
            .map(|s| s.to_string())
            .unwrap_or_default(),
    }
}

#[test]
fn unscripted_calls_return_zero_and_are_recorded() {
    let m = mock::session();
    // SAFETY: the mock touches no memory.
    let ret = unsafe { m.page().call_raw(17, [1, 2, 3, 4, 5]) };
    assert_eq!(ret, 0);
    // Hypercall 17 (xen_version) takes two arguments: the others are recorded as 0.
    assert_eq!(mock::args_used(17), 2);
    mock::assert_calls(&[MockCall::new(17, [1, 2, 0, 0, 0])]);
}

#[test]
fn scripts_queue_in_order_before_the_handler() {
    let m = mock::session();
    mock::script(30, 5);
    mock::script(30, -22);
    mock::on(30, |args| args[0] as i64 + 100);
    let calls: Vec<i64> = (0..4)
        // SAFETY: the mock touches no memory.
        .map(|i| unsafe { m.page().call_raw(30, [i, 0, 0, 0, 0]) })
        .collect();
    assert_eq!(calls, [5, -22, 102, 103]);
    // SAFETY: the mock touches no memory.
    assert_eq!(unsafe { m.page().call(30, [0; 5]) }, Ok(100));
    assert_eq!(mock::take_calls().len(), 5);
}

#[test]
fn every_entry_reaches_the_dispatcher_with_its_number() {
    let m = mock::session();
    for n in 0..128u32 {
        mock::script(n, i64::from(n) * 3);
        // SAFETY: the mock touches no memory.
        let ret = unsafe { m.page().call_raw(n, [u64::from(n); 5]) };
        assert_eq!(ret, i64::from(n) * 3);
    }
    let calls = mock::take_calls();
    assert_eq!(calls.len(), 128);
    for (n, call) in calls.iter().enumerate() {
        let mut args = [n as u64; 5];
        for unused in args.iter_mut().skip(mock::args_used(n as u32)) {
            *unused = 0;
        }
        assert_eq!(*call, MockCall::new(n as u32, args));
    }
}

#[test]
fn assert_calls_reports_a_readable_diff() {
    let m = mock::session();
    m.page().sched_yield().unwrap();
    m.page().evtchn_send(3).unwrap();
    let err = catch_unwind(AssertUnwindSafe(|| {
        mock::assert_calls(&[
            MockCall::new(nr::SCHED_OP, [0; 5]),
            MockCall::new(nr::SET_SEGMENT_BASE, [0, 1, 0, 0, 0]),
            MockCall::new(nr::SCHED_OP, [0; 5]),
        ]);
    }))
    .expect_err("sequences differ");
    let msg = panic_message(err);
    assert!(msg.contains("expected 3 call(s), got 2"), "{msg}");
    assert!(
        msg.contains("    #0 sched_op[29](0x0, 0x0, 0x0, 0x0, 0x0)"),
        "{msg}"
    );
    assert!(
        msg.contains("  - #1 set_segment_base[25](0x0, 0x1, 0x0, 0x0, 0x0)   (expected)"),
        "{msg}"
    );
    assert!(msg.contains("  + #1 event_channel_op[32](0x4, "), "{msg}");
    assert!(msg.contains("  - #2 sched_op[29]"), "{msg}");
}

#[test]
fn a_panicking_handler_fails_the_call_and_the_test() {
    let m = mock::session();
    mock::on(nr::SCHED_OP, |_| panic!("handler says no"));
    assert_eq!(m.page().sched_yield(), Err(Errno(-HANDLER_PANICKED as i32)));
    let err = catch_unwind(mock::take_calls).expect_err("the panic is resumed");
    assert_eq!(panic_message(err), "handler says no");
    // Once resumed it is gone.
    assert_eq!(mock::take_calls().len(), 1);
}

#[test]
fn a_session_drop_resumes_a_pending_handler_panic() {
    let err = catch_unwind(|| {
        let m = mock::session();
        mock::on(nr::SCHED_OP, |_| panic!("late"));
        let _ = m.page().sched_yield();
    })
    .expect_err("dropping the session resumes the panic");
    assert_eq!(panic_message(err), "late");
}

#[test]
fn a_session_drop_reports_unused_scripts() {
    let err = catch_unwind(|| {
        let _m = mock::session();
        mock::script(nr::XENPMU_OP, -95);
    })
    .expect_err("unused scripted result");
    let msg = panic_message(err);
    assert!(msg.contains("xenpmu_op[40]: [-95]"), "{msg}");
}

#[test]
fn reset_forgets_everything() {
    let m = mock::session();
    mock::script(1, 7);
    mock::on(2, |_| 9);
    // SAFETY: the mock touches no memory.
    unsafe { m.page().call_raw(3, [0; 5]) };
    mock::reset();
    assert!(mock::take_calls().is_empty());
    // SAFETY: the mock touches no memory.
    assert_eq!(unsafe { m.page().call_raw(1, [0; 5]) }, 0);
    // SAFETY: the mock touches no memory.
    assert_eq!(unsafe { m.page().call_raw(2, [0; 5]) }, 0);
    mock::take_calls();
}

#[test]
fn handlers_may_use_the_mock_api_and_replace_themselves() {
    let m = mock::session();
    mock::on(5, |_| {
        mock::on(5, |_| 2);
        1
    });
    // SAFETY: the mock touches no memory.
    let first = unsafe { m.page().call_raw(5, [0; 5]) };
    // SAFETY: the mock touches no memory.
    let second = unsafe { m.page().call_raw(5, [0; 5]) };
    assert_eq!((first, second), (1, 2));
    mock::take_calls();
}
