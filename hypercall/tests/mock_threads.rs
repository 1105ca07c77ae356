//! Eight threads use the mock page at once; each sees only its own calls, scripts and
//! handlers.
#![cfg(feature = "mock")]

use std::sync::{Arc, Barrier};

use xenmsr_hypercall::abi::SegmentBase;
use xenmsr_hypercall::mock::{self, MockCall};
use xenmsr_hypercall::{Errno, nr};

const THREADS: u64 = 8;
const ROUNDS: u64 = 200;

#[test]
fn eight_threads_are_isolated() {
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let m = mock::session();
                let page = m.page();
                // Per-thread scripts: thread t's results are t * 1000 + round.
                for round in 0..ROUNDS {
                    mock::script(nr::CONSOLE_IO, (t * 1000 + round) as i64);
                }
                // Per-thread handler: set_segment_base fails with EINVAL on odd threads.
                mock::on(nr::SET_SEGMENT_BASE, move |args| {
                    assert_eq!(
                        args[1] >> 32,
                        t,
                        "another thread's call reached this handler"
                    );
                    if t % 2 == 1 {
                        Errno::EINVAL.to_ret()
                    } else {
                        0
                    }
                });
                barrier.wait();
                let mut expected = Vec::new();
                for round in 0..ROUNDS {
                    let buf = [t as u8; 3];
                    assert_eq!(page.console_write(&buf), Ok(t * 1000 + round));
                    expected.push(MockCall::new(18, [0, 3, buf.as_ptr() as u64, 0, 0]));
                    let base = (t << 32) | round;
                    let want = if t % 2 == 1 {
                        Err(Errno::EINVAL)
                    } else {
                        Ok(())
                    };
                    // SAFETY: the mock page records the call; no segment base changes.
                    let got = unsafe { page.set_segment_base(SegmentBase::FS, base) };
                    assert_eq!(got, want);
                    expected.push(MockCall::new(25, [0, base, 0, 0, 0]));
                    if round % 16 == 0 {
                        std::thread::yield_now();
                    }
                }
                mock::assert_calls(&expected);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker thread failed");
    }
    // This (main test) thread made no calls.
    assert!(mock::take_calls().is_empty());
}
