//! While egressd is gone, the session's connects are answered here. Every connect(2) of the
//! session is a seccomp notification egressd's supervisor answers; with egressd stopped or
//! crashed they would wait until it comes back. egressctl keeps the listener (a restarted egressd
//! takes it from here), and once the control connection closes it lets each connect go on to the
//! kernel: the cgroup programs then judge it alone (inet by the policy, unix refused by the
//! backstop, since no supervisor vetted it), and record it in the pinned ring buffer for the next
//! egressd. A restarted egressd that has taken the listener signals [`resumed_signal`], and the
//! answering stops until that one is gone too (watched through a pidfd). A stopped egressd
//! (SIGSTOP) is answered for the same way while it is stopped, so connects never wait on it.

use std::{
    mem::MaybeUninit,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicI32, Ordering},
};

pub use egressd_common::protocol::resumed_signal;

/// The pid of the egressd that supervises now (set by its signal when one takes over).
static SUPERVISOR: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_resumed(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let pid = unsafe { (*info).si_pid() };
    // Only root (egressd) may signal this process besides its own uid: a sandboxed task cannot
    // (Landlock's signal scope), and a same-uid process outside could only make this stop
    // answering, which leaves the session's connects waiting, never unjudged.
    SUPERVISOR.store(pid, Ordering::Relaxed);
}

/// Starts the thread that answers for egressd while egressd (`daemon`, its pid) is gone.
pub fn start(listener: OwnedFd, daemon: i32) {
    SUPERVISOR.store(daemon, Ordering::Relaxed);
    // SAFETY: installing an SA_SIGINFO handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_resumed
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigaction(resumed_signal(), &sa, std::ptr::null_mut());
    }
    // The signal must interrupt this thread's poll: every other thread (this one, and the relays
    // started after it, which inherit the mask) blocks it.
    mask(libc::SIG_BLOCK);
    std::thread::spawn(move || {
        mask(libc::SIG_UNBLOCK);
        serve(listener)
    });
}

/// Blocks or unblocks the resumed signal in the calling thread.
fn mask(how: libc::c_int) {
    // SAFETY: a sigset of our own, filled by the libc calls, for this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, resumed_signal());
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open with integer arguments; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn serve(listener: OwnedFd) {
    let mut watched = 0;
    let mut daemon: Option<OwnedFd> = None;
    loop {
        let supervisor = SUPERVISOR.load(Ordering::Relaxed);
        if supervisor != watched {
            watched = supervisor;
            daemon = pidfd(supervisor);
        }
        // While egressd runs, wait for it to exit (its pidfd turns readable) or for the session
        // to end (the listener hangs up); while it is gone, answer for it.
        let (gone, listen) = match &daemon {
            Some(d) => (d.as_raw_fd(), 0),
            None => (-1, libc::POLLIN),
        };
        let mut fds = [
            libc::pollfd {
                fd: gone,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: listen,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds (a negative fd is skipped). egressd's exit, a waiting connect (while
        // it is gone), the session's end or the resumed signal (EINTR) wake it; and once a second,
        // while egressd runs, a look at whether it is stopped.
        let timeout = if daemon.is_some() { STALL_CHECK_MS } else { -1 };
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n == 0 {
            if stopped(watched) {
                // A stopped egressd (SIGSTOP) answers nothing: let the waiting connects go on to
                // the kernel's programs, as while it is gone, until it runs again.
                while pending(&listener) && stopped(watched) {
                    answer_one(&listener);
                }
            }
            continue;
        }
        if n < 0 {
            continue;
        }
        if fds[1].revents & libc::POLLHUP != 0 {
            // Every task of the session is gone.
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            daemon = None;
            continue;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            answer_one(&listener);
        }
    }
}

/// How often a running egressd is looked at for being stopped.
const STALL_CHECK_MS: i32 = 1000;

/// Whether process `pid` is stopped (`T` in /proc/PID/stat: SIGSTOP, or a debugger).
fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(") ")?.1;
            after.chars().next()
        })
        .is_some_and(|state| state == 'T' || state == 't')
}

/// Whether a connect waits for an answer.
fn pending(listener: &OwnedFd) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd of our own descriptor, no waiting.
    unsafe { libc::poll(&mut fd, 1, 0) == 1 && fd.revents & libc::POLLIN != 0 }
}

/// Lets one waiting connect go on to the kernel's programs.
fn answer_one(listener: &OwnedFd) {
    // SAFETY: the kernel requires a zeroed struct and fills it.
    let mut req: libc::seccomp_notif = unsafe { MaybeUninit::zeroed().assume_init() };
    // SAFETY: NOTIF_RECV into a struct of the type the ioctl names.
    if unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut req,
        )
    } < 0
    {
        return;
    }
    let mut resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error: 0,
        flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    };
    // SAFETY: NOTIF_SEND with a struct of the type the ioctl names.
    unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp,
        )
    };
}
