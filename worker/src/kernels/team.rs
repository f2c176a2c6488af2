//! The threads a rank's kernels split their loops over: a fixed team whose helpers stay
//! awake (spinning) between the loops of a step and park only when idle for a while, so
//! a parallel loop costs a few atomic operations instead of a thread wake-up. A step
//! runs a dozen loops per layer, many of them a few microseconds long; with a pool that
//! puts idle threads to sleep, every one of them paid a futex wake-up.
//!
//! A loop is `n` tasks claimed one at a time from a shared counter by the calling
//! thread and every helper, so a slow or descheduled thread never holds up more than the
//! task it is in; the call returns once every helper has left the loop. One loop runs
//! at a time per team: a second caller (or a loop started inside a task) runs its tasks
//! itself. Which thread runs a task never changes what it computes.
//!
//! [`Team::install`] makes a team the current one of a thread (a rank's); kernels reach it
//! through [`for_each`]. Threads without one (tests, tools) share a process-wide team
//! as wide as the machine.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks: longer than the serial stretches
/// between the loops of a step (RoPE and KV writes, residual sums: tens of
/// microseconds), short enough that between steps (sampling, the coordinator's round
/// trip) and beside other work in the process (a reference model in a test, the
/// coordinator in `shardline up`) it does not keep a core busy for nothing.
const SPIN: Duration = Duration::from_micros(100);

/// A value on its own cache line, so the counters the threads hammer do not share one.
#[repr(align(64))]
struct Line<T>(T);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    /// Bumped once per loop; a helper runs a loop when it sees the epoch change.
    epoch: Line<AtomicU64>,
    /// Next task of the current loop.
    next: Line<AtomicUsize>,
    /// Helpers not yet done with the current loop.
    busy: Line<AtomicUsize>,
    /// The current loop: its tasks and their count. Written by the one submitter only
    /// while `busy == 0` (no helper is in a loop), read by helpers after the epoch store
    /// that published it.
    job: UnsafeCell<Option<(*const Task<'static>, usize)>>,
    /// A task panicked on a helper during the current loop.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Helpers parked on `wake` (changed under `parking`).
    parked: AtomicUsize,
    parking: Mutex<()>,
    wake: Condvar,
    /// Held by the thread running a loop.
    submit: Mutex<()>,
}

// SAFETY: every field but `job` is a sync primitive; `job` is written only by the holder of
// `submit` while no helper is inside a loop (`busy == 0`), and read by helpers only between
// seeing a new epoch (Acquire, after the writer's SeqCst bump) and decrementing `busy`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw task pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A rank's kernel threads: the thread that calls [`Team::for_each`] plus `threads - 1`
/// helpers.
pub struct Team {
    shared: Arc<Shared>,
    threads: usize,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

thread_local! {
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
    /// Set while this thread runs a task: a loop inside a task runs inline.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

static DEFAULT: LazyLock<Team> = LazyLock::new(|| {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    Team::new(n, "shardline-kernels")
});

impl Team {
    /// A team of `threads` (at least 1) whose helpers are named `name-1`, `name-2`, ….
    pub fn new(threads: usize, name: &str) -> Team {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: Line(AtomicU64::new(0)),
            next: Line(AtomicUsize::new(0)),
            busy: Line(AtomicUsize::new(0)),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            parking: Mutex::new(()),
            wake: Condvar::new(),
            submit: Mutex::new(()),
        });
        let helpers = (1..threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || helper(&shared))
                    .expect("cannot spawn a kernel thread")
            })
            .collect();
        Team {
            shared,
            threads,
            helpers,
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` with this team as the calling thread's current one.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        let _restore = Reset::to(&CURRENT, self as *const Team);
        f()
    }

    /// Runs `f(0..n)`, the tasks spread over the team; returns when all have run.
    pub fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let inline = n <= 1 || self.threads == 1 || IN_TASK.get();
        let guard = if inline {
            None
        } else {
            self.shared.submit.try_lock().ok()
        };
        let Some(_submit) = guard else {
            return (0..n).for_each(f);
        };
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: `Join` below
        // waits, even when a task panics, until no helper can touch `f` any more.
        let task: *const Task<'static> = unsafe { std::mem::transmute(f as *const Task<'_>) };
        // SAFETY: we hold `submit` and the previous loop ended with `busy == 0`.
        unsafe { *s.job.get() = Some((task, n)) };
        s.next.0.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.busy.0.store(self.threads - 1, Ordering::Relaxed);
        s.epoch.0.fetch_add(1, Ordering::SeqCst);
        if s.parked.load(Ordering::SeqCst) > 0 {
            let _p = s.parking.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        /// Waits for the helpers to leave the loop when dropped (also on unwinding).
        struct Join<'a>(&'a Shared);
        impl Drop for Join<'_> {
            fn drop(&mut self) {
                let mut spins = 0u32;
                while self.0.busy.0.load(Ordering::Acquire) > 0 {
                    spins += 1;
                    if spins < 4096 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
        let join = Join(s);
        run_tasks(s, f, n);
        drop(join);
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a kernel task panicked on a helper thread");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _p = self
                .shared
                .parking
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team")
            .field("threads", &self.threads)
            .finish()
    }
}

/// A thread-local set for a scope: the old value comes back when this drops (also when
/// the scope unwinds).
struct Reset<T: Copy + 'static> {
    key: &'static std::thread::LocalKey<Cell<T>>,
    old: T,
}

impl<T: Copy + 'static> Reset<T> {
    fn to(key: &'static std::thread::LocalKey<Cell<T>>, value: T) -> Self {
        Reset {
            key,
            old: key.replace(value),
        }
    }
}

impl<T: Copy + 'static> Drop for Reset<T> {
    fn drop(&mut self) {
        self.key.set(self.old);
    }
}

/// Claims and runs tasks of the current loop until none is left.
fn run_tasks(s: &Shared, f: &Task<'_>, n: usize) {
    let _restore = Reset::to(&IN_TASK, true);
    loop {
        let i = s.next.0.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

/// A helper's life. It starts from epoch 0, the one before any loop: a loop published
/// before the thread first runs is still ahead of it.
fn helper(s: &Shared) {
    let mut seen = 0;
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Relaxed) {
                return;
            }
            if s.epoch.0.load(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || idle.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut p = s.parking.lock().unwrap_or_else(|e| e.into_inner());
            s.parked.fetch_add(1, Ordering::SeqCst);
            while s.epoch.0.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                p = s.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            s.parked.fetch_sub(1, Ordering::SeqCst);
        }
        seen = s.epoch.0.load(Ordering::Acquire);
        // SAFETY: the epoch we just saw published this job, and the submitter does not
        // touch it again before we decrement `busy` below.
        let Some((task, n)) = (unsafe { *s.job.get() }) else {
            unreachable!("an epoch is bumped only with a job; this is a bug")
        };
        // SAFETY: `task` outlives the loop: its submitter waits for `busy == 0`.
        let f = unsafe { &*task };
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, f, n)));
        if ok.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.busy.0.fetch_sub(1, Ordering::Release);
    }
}

/// The calling thread's team (the process-wide one if none is installed).
fn current<R>(f: impl FnOnce(&Team) -> R) -> R {
    let t = CURRENT.get();
    if t.is_null() {
        f(&DEFAULT)
    } else {
        // SAFETY: `install` keeps the team borrowed while it is current.
        f(unsafe { &*t })
    }
}

/// Threads of the calling thread's team.
pub fn threads() -> usize {
    current(Team::threads)
}

/// Runs `f(0..n)` on the calling thread's team.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    current(|t| t.for_each(n, &f))
}

/// Runs `f(i, chunk_i)` for each `chunk`-long piece of `data` (the last may be shorter)
/// on the calling thread's team.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = SendPtr(data.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: task `i` alone gets elements `start..start + n`, inside `data`, which
        // stays mutably borrowed for the whole loop.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, part)
    })
}

/// A raw pointer tasks may share (each touching its own elements).
pub(crate) struct SendPtr<T>(pub *mut T);

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    pub fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: users only write disjoint elements from different tasks (see each use).
unsafe impl<T: Send> Sync for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_across_many_loops() {
        let team = Team::new(3, "test");
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..50 {
                team.for_each(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 50),
                "n = {n}"
            );
        }
    }

    #[test]
    fn chunks_cover_the_slice_and_nested_loops_run_inline() {
        let team = Team::new(2, "test");
        let mut v = vec![0usize; 1003];
        team.install(|| {
            for_each_chunk_mut(&mut v, 10, |i, c| {
                for (j, x) in c.iter_mut().enumerate() {
                    *x = i * 10 + j;
                }
                // A loop inside a task runs on this thread.
                let inner = AtomicU32::new(0);
                for_each(4, |_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(inner.load(Ordering::Relaxed), 4);
            });
            assert_eq!(threads(), 2);
        });
        assert!(v.iter().enumerate().all(|(i, &x)| i == x));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2, "test");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.for_each(64, &|i| assert_ne!(i, 33, "task 33 fails"));
        }));
        assert!(r.is_err());
        let count = AtomicU32::new(0);
        team.for_each(64, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn parked_helpers_wake_for_the_next_loop() {
        let team = Team::new(2, "test");
        std::thread::sleep(SPIN * 3);
        let count = AtomicU32::new(0);
        team.for_each(1000, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 1000);
    }
}
