//! Secondary vCPUs: their stacks, which vCPU is running, bringing them up with
//! `VCPUOP_initialise`/`VCPUOP_up`, and the "team" that runs a job on every vCPU at once or
//! stops the world around a job on vCPU 0.
//!
//! # Which vCPU am I?
//!
//! Every vCPU runs on its own 64 KiB stack, one slot of `pvk_stacks`, and a PV kernel's
//! exceptions and upcalls arrive on the interrupted stack. So the vCPU id is the stack
//! pointer's slot: `(rsp - pvk_stacks) >> 16`, one subtraction and one shift, with no
//! per-CPU segment (the suites write GS and FS bases freely, so the kernel cannot keep
//! per-CPU data behind them) and nothing to set up. The tracing hypercall page uses the
//! same rule in assembly.
//!
//! # The team
//!
//! vCPU 0 drives; the others wait in [`worker_loop`]. [`run_on_all`] publishes a job,
//! runs it on vCPU 0 too and waits until every vCPU has finished it. [`stop_the_world`]
//! parks every other vCPU with its upcalls masked, spinning outside any MSR call site,
//! runs a closure on vCPU 0 with its own upcalls masked, serialises every vCPU and lets
//! them go: the kernel's side of the library's patching contract.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use xenmsr_hypercall::Errno;
use xenmsr_hypercall::abi::VcpuGuestContext;

use crate::hv;

/// The most vCPUs the kernel runs.
pub const MAX_VCPUS: usize = 8;
/// log2 of a vCPU stack's size.
pub const STACK_SHIFT: u32 = 16;
/// Size of each vCPU's stack.
pub const STACK_SIZE: usize = 1 << STACK_SHIFT;

global_asm!(
    r#"
    .pushsection .bss.pvk_stacks, "aw", @nobits
    .p2align {shift}
    .globl pvk_stacks
pvk_stacks:
    .skip {size}
    .popsection

    /* A secondary vCPU starts here with the context `start_secondaries` gave it:
       rsp = the top of its stack, rdi = its id, events masked. */
    .pushsection .text.pvk_secondary, "ax", @progbits
    .globl pvk_secondary_start
    .type pvk_secondary_start, @function
pvk_secondary_start:
    cld
    and $-16, %rsp
    xor %ebp, %ebp
    call {main}
    ud2
    .size pvk_secondary_start, . - pvk_secondary_start
    .popsection
    "#,
    shift = const STACK_SHIFT,
    size = const STACK_SIZE * MAX_VCPUS,
    main = sym secondary_main,
    options(att_syntax)
);

unsafe extern "C" {
    static pvk_stacks: [u8; 0];
    fn pvk_secondary_start();
}

/// The base of the stack array.
pub fn stacks_base() -> usize {
    (&raw const pvk_stacks) as usize
}

/// The top of vCPU `vcpu`'s stack.
pub fn stack_top(vcpu: usize) -> usize {
    stacks_base() + (vcpu + 1) * STACK_SIZE
}

/// The vCPU this code runs on (from the stack pointer; see the module docs).
#[inline(always)]
pub fn current_vcpu() -> u32 {
    let sp: usize;
    // SAFETY: reads rsp; no memory, stack or flags are touched.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    (sp.wrapping_sub(stacks_base()) >> STACK_SHIFT) as u32
}

/// [`current_vcpu`] as an index, checked against [`MAX_VCPUS`] (a stack pointer outside
/// every vCPU stack is a kernel bug: stop).
pub fn vcpu_index() -> usize {
    let v = current_vcpu() as usize;
    if v >= MAX_VCPUS {
        crate::exit::crash();
    }
    v
}

/// One value per vCPU, each on its own cache lines (no false sharing between vCPUs).
#[repr(C, align(128))]
pub struct CacheAligned<T>(pub T);

/// `[T; MAX_VCPUS]`, cache-line separated.
pub type PerVcpu<T> = [CacheAligned<T>; MAX_VCPUS];

/// How many vCPUs run (1 until `start_secondaries`).
static ONLINE: AtomicU32 = AtomicU32::new(1);
/// Set by each secondary once it has installed its events and is ready for jobs.
static READY: [AtomicBool; MAX_VCPUS] = [const { AtomicBool::new(false) }; MAX_VCPUS];

/// The number of vCPUs running the suites.
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// Why the secondaries did not come up.
#[derive(Debug)]
pub enum BringUpError {
    /// `VCPUOP_is_up` for a vCPU that should exist.
    Missing(u32, Errno),
    /// The domain has more vCPUs than the command line said.
    Extra(u32),
    /// `VCPUOP_initialise` failed.
    Initialise(u32, Errno),
    /// `VCPUOP_up` failed.
    Up(u32, Errno),
    /// The vCPU did not report ready in time.
    Timeout(u32),
    /// More vCPUs than this kernel has stacks for.
    TooMany(u32),
}

impl core::fmt::Display for BringUpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BringUpError::Missing(v, e) => write!(f, "vCPU {v} does not exist: {e}"),
            BringUpError::Extra(v) => write!(f, "the domain has a vCPU {v} too many"),
            BringUpError::Initialise(v, e) => write!(f, "VCPUOP_initialise({v}): {e}"),
            BringUpError::Up(v, e) => write!(f, "VCPUOP_up({v}): {e}"),
            BringUpError::Timeout(v) => write!(f, "vCPU {v} never reported ready"),
            BringUpError::TooMany(n) => {
                write!(f, "{n} vCPUs: this kernel has stacks for {MAX_VCPUS}")
            }
        }
    }
}

/// The initial context of secondary `vcpu`: the kit's (`xenmsr::smp::initial_context`:
/// kernel mode, the kernel's page tables, the kit's trap table and callbacks, FSGSBASE if
/// enabled, events masked) at this kernel's entry on the vCPU's own stack slot, with
/// `rdi` = its id.
fn secondary_context(vcpu: u32) -> VcpuGuestContext {
    let mut ctx = xenmsr::smp::initial_context(
        pvk_secondary_start as *const () as usize as u64,
        stack_top(vcpu as usize) as u64,
    );
    ctx.user_regs.rdi = u64::from(vcpu);
    ctx
}

/// Brings up vCPUs 1..`count` (each must exist, and vCPU `count` must not) and waits
/// until each has registered its events and entered [`worker_loop`].
pub fn start_secondaries(count: u32) -> Result<u32, BringUpError> {
    if count as usize > MAX_VCPUS {
        return Err(BringUpError::TooMany(count));
    }
    let page = hv::page();
    for v in 0..count {
        page.vcpu_is_up(v)
            .map_err(|e| BringUpError::Missing(v, e))?;
    }
    match page.vcpu_is_up(count) {
        Err(Errno::ENOENT) => {}
        _ if count as usize == MAX_VCPUS => {}
        _ => return Err(BringUpError::Extra(count)),
    }
    for v in 1..count {
        let ctx = secondary_context(v);
        // SAFETY: the context starts `pvk_secondary_start` (which never returns) on vCPU
        // `v`'s own stack slot, with this kernel's page tables, trap stubs and callbacks.
        unsafe { page.vcpu_initialise(v, &ctx) }.map_err(|e| BringUpError::Initialise(v, e))?;
        // SAFETY: just initialised with that context.
        unsafe { page.vcpu_up(v) }.map_err(|e| BringUpError::Up(v, e))?;
        let mut spins = 0u64;
        while !READY[v as usize].load(Ordering::Acquire) {
            let _ = page.sched_yield();
            spins += 1;
            if spins > 1_000_000 {
                return Err(BringUpError::Timeout(v));
            }
        }
    }
    ONLINE.store(count, Ordering::Release);
    Ok(count)
}

/// A secondary vCPU's Rust entry, on its own stack with events masked.
extern "C" fn secondary_main(vcpu: u64) -> ! {
    let vcpu = vcpu as u32;
    if current_vcpu() != vcpu {
        crate::println!(
            "PANIC: vCPU {vcpu} runs on the stack of vCPU {}",
            current_vcpu()
        );
        crate::exit::crash();
    }
    if let Err(e) = crate::events::init_vcpu(vcpu) {
        crate::println!("PANIC: vCPU {vcpu}: events: {e}");
        crate::exit::crash();
    }
    READY[vcpu as usize].store(true, Ordering::Release);
    worker_loop(vcpu)
}

// ---------------------------------------------------------------------------------------
// The team.
// ---------------------------------------------------------------------------------------

/// What the secondaries do next.
#[derive(Clone, Copy)]
enum Job {
    /// Run a function with the vCPU id.
    Run(fn(u32)),
    /// Park with upcalls masked until released (stop the world).
    Park,
}

static JOB: spin::Mutex<Option<Job>> = spin::Mutex::new(None);
/// Bumped by vCPU 0 for each new job; each secondary runs each generation once.
static GENERATION: AtomicUsize = AtomicUsize::new(0);
/// Secondaries that finished the current generation's job (or have parked).
static DONE: AtomicU32 = AtomicU32::new(0);
/// Cleared by vCPU 0 to release parked vCPUs.
static PARKED_HOLD: AtomicBool = AtomicBool::new(false);

/// Waits until `cond` holds, sleeping in short polls in between so that a waiting vCPU
/// neither burns its physical CPU nor makes Xen switch to it over and over (which the
/// run-state accounting of the vCPUs that work would pay for).
fn wait_until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        idle_briefly();
    }
}

/// Blocks this vCPU for about [`IDLE_POLL_NS`] (`SCHEDOP_poll` of its timer port, so a
/// timer event also ends it), or yields if events are not set up yet.
pub fn idle_briefly() {
    match crate::events::timer_port() {
        Some(port) => {
            let deadline = crate::events::now_ns() + IDLE_POLL_NS;
            let _ = hv::page().sched_poll(&[port], deadline);
        }
        None => {
            let _ = hv::page().sched_yield();
        }
    }
}

/// How long a waiting vCPU sleeps between looks at what it waits for.
const IDLE_POLL_NS: u64 = 50_000;

fn publish(job: Job) -> usize {
    *JOB.lock() = Some(job);
    DONE.store(0, Ordering::Release);
    GENERATION.fetch_add(1, Ordering::AcqRel) + 1
}

/// A secondary's life after bring-up: run each published job once.
fn worker_loop(vcpu: u32) -> ! {
    let mut seen = 0;
    loop {
        wait_until(|| GENERATION.load(Ordering::Acquire) != seen);
        seen = GENERATION.load(Ordering::Acquire);
        let job = *JOB.lock();
        match job {
            Some(Job::Run(f)) => {
                f(vcpu);
                DONE.fetch_add(1, Ordering::AcqRel);
            }
            Some(Job::Park) => park(),
            None => {}
        }
    }
}

/// Runs `job` on every online vCPU at once (vCPU 0 included) and returns when all have
/// finished. Only vCPU 0 may call it.
pub fn run_on_all(job: fn(u32)) {
    let others = online() - 1;
    publish(Job::Run(job));
    job(0);
    wait_until(|| DONE.load(Ordering::Acquire) == others);
}

/// A parked vCPU: masked, counted, spinning (not in any MSR site) until released, then
/// serialised so that it fetches any code vCPU 0 rewrote.
fn park() {
    let mask = crate::events::mask();
    DONE.fetch_add(1, Ordering::AcqRel);
    wait_until(|| !PARKED_HOLD.load(Ordering::Acquire));
    serialise();
    // If vCPU 0's `xenmsr::init` (run while this vCPU was parked) switched the sites to
    // FSGSBASE, this vCPU needs CR4.FSGSBASE too before it runs one (upcalls are still
    // masked here, so no site runs first).
    if xenmsr::fsgsbase::enabled() {
        // SAFETY: a PV guest kernel may write CR4 (Xen emulates it); only FSGSBASE is
        // added, and this kernel keeps nothing behind the user FS/GS bases.
        let on = unsafe { xenmsr::fsgsbase::enable_on_this_vcpu() };
        if !on {
            crate::println!("PANIC: Xen dropped CR4.FSGSBASE on a secondary vCPU");
            crate::exit::crash();
        }
    }
    drop(mask);
    DONE.fetch_add(1, Ordering::AcqRel);
}

/// A serialising instruction (`cpuid`), after which this vCPU executes the code as it is
/// in memory now.
pub fn serialise() {
    let _ = core::arch::x86_64::__cpuid_count(0, 0);
}

/// Stops every other vCPU (parked, upcalls masked, outside any call site), runs `f` on
/// vCPU 0 with its own upcalls masked, serialises, and releases them; returns `f`'s
/// result once all have resumed. Only vCPU 0 may call it. This is the stop-the-world the
/// library's patching contract asks of the kernel.
pub fn stop_the_world<R>(f: impl FnOnce() -> R) -> R {
    park_others(true, f)
}

/// As [`stop_the_world`], but vCPU 0 keeps taking upcalls while `f` runs: for tests that
/// must run alone (they rewrite a site only they execute, or count something global).
pub fn with_others_parked<R>(f: impl FnOnce() -> R) -> R {
    park_others(false, f)
}

fn park_others<R>(mask_self: bool, f: impl FnOnce() -> R) -> R {
    let others = online() - 1;
    PARKED_HOLD.store(true, Ordering::Release);
    publish(Job::Park);
    wait_until(|| DONE.load(Ordering::Acquire) == others);
    let mask = mask_self.then(crate::events::mask);
    let r = f();
    serialise();
    drop(mask);
    PARKED_HOLD.store(false, Ordering::Release);
    wait_until(|| DONE.load(Ordering::Acquire) == 2 * others);
    r
}

/// A barrier for the vCPUs running one [`run_on_all`] job: every online vCPU must call it
/// the same number of times. Waits yield, so vCPUs sharing a physical CPU get to arrive.
pub fn barrier() {
    let n = online();
    let generation = BARRIER_GENERATION.load(Ordering::Acquire);
    if BARRIER_ARRIVED.fetch_add(1, Ordering::AcqRel) + 1 == n {
        BARRIER_ARRIVED.store(0, Ordering::Release);
        BARRIER_GENERATION.fetch_add(1, Ordering::AcqRel);
    } else {
        wait_until(|| BARRIER_GENERATION.load(Ordering::Acquire) != generation);
    }
}

static BARRIER_ARRIVED: AtomicU32 = AtomicU32::new(0);
static BARRIER_GENERATION: AtomicUsize = AtomicUsize::new(0);
