//! Stubs and sites from 8 threads at once, each with its own script, on every path.

use xenmsr_asm::stubs::Stub;
use xenmsr_asm::{MsrError, Outcome, site};
use xenmsr_host_tests::{RegState, call_stub, fixups, install, r, set_script};
use xenmsr_hypercall::Errno;

const THREADS: u64 = 8;
const ITERATIONS: u64 = 3_000;

/// xorshift64*: deterministic per-thread values without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn worker(id: u64) -> u64 {
    install();
    let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (id + 1);
    let mut checked = 0;
    for i in 0..ITERATIONS {
        let value = next(&mut rng);
        let msr = next(&mut rng) as u32;
        let error = MsrError::Hypercall(Errno((id * 1000 + i) as i32));
        let (ill0, segv0) = fixups();
        match i % 6 {
            0 => {
                set_script(Outcome::Done(value));
                // SAFETY: the scripted backend answers.
                assert_eq!(unsafe { site::rdmsr_safe(msr) }, Ok(value));
            }
            1 => {
                set_script(Outcome::Failed(error));
                // SAFETY: the backend fails; the stub traps and rewinds.
                assert_eq!(unsafe { site::wrmsr_safe(msr, value) }, Err(error));
                assert_eq!(fixups(), (ill0 + 1, segv0));
            }
            2 => {
                set_script(Outcome::Native);
                // SAFETY: the stub's RDMSR faults in ring 3 and is fixed up.
                let result = unsafe { site::rdmsr_safe(msr) };
                assert_eq!(result, Err(MsrError::Fault { vector: 13 }));
                assert_eq!(fixups(), (ill0, segv0 + 1));
            }
            _ => {
                let stub = Stub::ALL[(i as usize / 6) % 4];
                let path = i % 6 - 3;
                set_script(match path {
                    0 => Outcome::Done(value),
                    1 => Outcome::Failed(error),
                    _ => Outcome::Native,
                });
                let mut input = [0u64; 16];
                for reg in &mut input {
                    *reg = next(&mut rng);
                }
                input[r::RSP] = 0;
                let mut state = RegState {
                    input,
                    ..RegState::default()
                };
                call_stub(stub, &mut state, i % 2 == 0);
                assert_eq!(state.rsp_after, state.rsp_before);
                for reg in [r::RBX, r::RBP, r::RDI, r::RCX, 8, 9, 10, 11, 12, 13, 14, 15] {
                    assert_eq!(
                        state.output[reg], input[reg],
                        "thread {id} {stub:?} reg {reg}"
                    );
                }
                if path == 0 {
                    assert_eq!(state.output[r::RSI], input[r::RSI]);
                } else if path == 1 {
                    assert_eq!(state.output[r::RSI], error.to_code());
                } else if stub != Stub::Rdpmc {
                    assert_eq!(
                        state.output[r::RSI],
                        MsrError::Fault { vector: 13 }.to_code()
                    );
                }
            }
        }
        checked += 1;
    }
    checked
}

#[test]
fn eight_threads_at_once() {
    install();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|id| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                worker(id)
            })
        })
        .collect();
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("worker panicked"))
        .sum();
    assert_eq!(total, THREADS * ITERATIONS);
}
