//! A long core operation (pack, plan, index, merge, verify, unpack) on a thread of its own, so
//! that the caller can wait in short steps: show progress, notice Ctrl-C, and cancel it cleanly.

use crate::error::{Error, Result};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Counters the caller may read while a long operation runs, and its cancel switch. What a
/// phase and a "file" are depends on the operation: for pack, phase 0 walks, 1 packs, 2
/// finishes, 3 is done, and files are input files; verify counts samples, merge shards.
#[derive(Default)]
pub struct Progress {
    pub phase: AtomicU8,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// 0 when not known.
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub cancel: AtomicBool,
}

impl Progress {
    /// Enters `phase`, with its totals; the done counters restart at zero.
    pub fn start(&self, phase: u8, files_total: u64, bytes_total: u64) {
        self.files_done.store(0, Relaxed);
        self.bytes_done.store(0, Relaxed);
        self.files_total.store(files_total, Relaxed);
        self.bytes_total.store(bytes_total, Relaxed);
        self.phase.store(phase, Relaxed);
    }

    /// Counts `files` and `bytes` as done.
    pub fn add(&self, files: u64, bytes: u64) {
        self.files_done.fetch_add(files, Relaxed);
        self.bytes_done.fetch_add(bytes, Relaxed);
    }

    /// `Err(Cancelled)` once the caller asked the operation to stop.
    pub fn check(&self) -> Result<()> {
        crate::fault::slow_step();
        if self.cancel.load(Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A running operation. Dropping it without [`Job::cancel`] detaches the thread.
pub struct Job<T> {
    rx: Receiver<Result<T>>,
    handle: Option<JoinHandle<()>>,
    progress: Arc<Progress>,
}

impl<T: Send + 'static> Job<T> {
    /// Starts `work` on a new thread named `name`; it gets the job's progress counters (and
    /// their cancel flag, which it checks).
    pub fn spawn(name: &str, work: impl FnOnce(&Progress) -> Result<T> + Send + 'static) -> Result<Job<T>> {
        let progress = Arc::new(Progress::default());
        let (tx, rx) = mpsc::channel();
        let st = progress.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = tx.send(work(&st));
            })
            .map_err(|e| Error::io("start thread", name, e))?;
        Ok(Job { rx, handle: Some(handle), progress })
    }

    /// The counters the operation updates.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Waits up to `timeout` for the result; `None` while it is still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<Result<T>> {
        let r = match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => Err(Error::format(".", "the worker thread stopped unexpectedly")),
        };
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        Some(r)
    }

    /// Asks the operation to stop, then waits until it has (it removes its temporary files).
    pub fn cancel(mut self) {
        self.progress.cancel.store(true, Relaxed);
        let _ = self.rx.recv();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_returns_its_result_and_cancel_stops_it() {
        let mut j = Job::spawn("t", |_| Ok(7)).unwrap();
        let r = loop {
            if let Some(r) = j.wait(Duration::from_millis(10)) {
                break r;
            }
        };
        assert_eq!(r.unwrap(), 7);
        let j = Job::spawn("t", |p: &Progress| {
            while !p.cancel.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err::<(), _>(Error::Cancelled)
        })
        .unwrap();
        j.cancel();
    }
}
