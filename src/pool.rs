//! Scoped worker threads: every parallel step of packds starts its threads inside a
//! `std::thread::scope`, so no pool outlives the call (the process may fork later). Under a low
//! process/thread limit (`ulimit -u`) a step runs with the threads it could get.

use crate::error::{Error, Result};

/// Starts up to `n` threads named `name`, each running `work`, then runs `main(started)` on the
/// calling thread while they run; returns `main`'s result once every thread has finished.
pub fn with_workers<F: Fn() + Sync, R>(n: usize, name: &str, work: &F, main: impl FnOnce(usize) -> R) -> R {
    std::thread::scope(|sc| {
        let started = (0..n).filter(|_| std::thread::Builder::new().name(name.into()).spawn_scoped(sc, work).is_ok()).count();
        main(started)
    })
}

/// Runs `work` on up to `n` threads named `name` and waits for them; returns how many started
/// (0: none could be, and `work` did not run).
pub fn scoped_workers<F: Fn() + Sync>(n: usize, name: &str, work: &F) -> usize {
    with_workers(n, name, work, |started| started)
}

/// Runs `work` on `n` threads in all, the calling thread one of them (so the work is done even
/// when no thread can be started); `n - 1` threads named `name` are started.
pub fn run_with_caller<F: Fn() + Sync>(n: usize, name: &str, work: &F) {
    with_workers(n.saturating_sub(1), name, work, |_| work());
}

/// The error of a step that cannot run without threads of its own when none could be started.
pub fn no_thread(what: &str, hint: &str) -> Error {
    Error::usage(format!("cannot start any {what} thread"), format!("raise the thread limit (ulimit -u) or {hint}"))
}

/// [`with_workers`] for a `main` that needs at least one worker: fails with [`no_thread`]
/// (without running `main`) when none could be started.
pub fn with_some_workers<F: Fn() + Sync, R>(n: usize, name: &str, what: &str, hint: &str, work: &F, main: impl FnOnce() -> Result<R>) -> Result<R> {
    with_workers(n, name, work, |started| if started == 0 { Err(no_thread(what, hint)) } else { main() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    #[test]
    fn every_thread_runs_and_is_named() {
        let ran = AtomicUsize::new(0);
        let named = AtomicUsize::new(0);
        let work = || {
            ran.fetch_add(1, Relaxed);
            if std::thread::current().name() == Some("packds-test") {
                named.fetch_add(1, Relaxed);
            }
        };
        assert_eq!(scoped_workers(3, "packds-test", &work), 3);
        assert_eq!((ran.load(Relaxed), named.load(Relaxed)), (3, 3));
        run_with_caller(3, "packds-test", &work);
        assert_eq!((ran.load(Relaxed), named.load(Relaxed)), (6, 5));
        run_with_caller(0, "packds-test", &work);
        assert_eq!(ran.load(Relaxed), 7, "the caller works even with no threads");
        let r = with_some_workers(0, "x", "I/O", "lower --threads", &work, || Ok(1));
        assert_eq!(r.unwrap_err().to_string().lines().next().unwrap(), "cannot start any I/O thread");
    }
}
