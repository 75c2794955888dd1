//! Stopping the supervisors without leaving a connect unanswered. A notification the supervisor
//! has received is answered by no one else: egressctl, which answers for a stopped egressd, holds
//! the same listener and so keeps it open, and the kernel fails a received notification only when
//! the last holder closes it. A process that exits between receiving and answering would leave
//! that connect waiting for ever. So at a stop every supervisor answers what it has received, takes
//! nothing more (what waits is egressctl's to answer once egressd is gone), and egressd exits only
//! after the last one has.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

static STOPPING: AtomicBool = AtomicBool::new(false);
/// Supervisor loops running, and unix connects being decided on threads of their own.
static BUSY: AtomicUsize = AtomicUsize::new(0);
/// The supervisor threads, to interrupt their wait for the next notification.
static THREADS: Mutex<Vec<libc::pthread_t>> = Mutex::new(Vec::new());

/// Interrupts a supervisor's NOTIF_RECV or poll (EINTR); its handler does nothing.
fn wake_signal() -> i32 {
    libc::SIGRTMIN() + 4
}

extern "C" fn on_wake(_: libc::c_int) {}

pub fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Held while a supervisor loop runs (registered for wake-ups) or a connect is being decided.
pub struct Busy {
    thread: Option<libc::pthread_t>,
}

impl Busy {
    /// A supervisor loop on the calling thread.
    pub fn supervisor() -> Busy {
        install_handler();
        BUSY.fetch_add(1, Ordering::SeqCst);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Ok(mut t) = THREADS.lock() {
            t.push(me);
        }
        Busy { thread: Some(me) }
    }

    /// A received notification being decided on another thread.
    pub fn decision() -> Busy {
        BUSY.fetch_add(1, Ordering::SeqCst);
        Busy { thread: None }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(me) = self.thread {
            if let Ok(mut t) = THREADS.lock() {
                t.retain(|x| *x != me);
            }
        }
        BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

fn install_handler() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        // SAFETY: a handler that does nothing; no SA_RESTART, so a blocked NOTIF_RECV or poll
        // returns EINTR and the loop sees `stopping()`.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wake as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(wake_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Makes every supervisor answer what it holds and stop; waits for them, at most `limit`.
/// Returns how many were still busy at the limit (0: none).
pub fn stop_all(limit: Duration) -> usize {
    STOPPING.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + limit;
    loop {
        let busy = BUSY.load(Ordering::SeqCst);
        if busy == 0 || Instant::now() >= deadline {
            return busy;
        }
        // Again every few milliseconds: a signal that lands just before a thread enters its wait
        // is lost, the next one is not.
        if let Ok(threads) = THREADS.lock() {
            for t in threads.iter() {
                // SAFETY: the thread is registered only while its loop runs (Busy's drop takes
                // it out under this lock), so the id is live.
                unsafe { libc::pthread_kill(*t, wake_signal()) };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
