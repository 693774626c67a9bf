//! The ordered window between the I/O threads and the writer: chunks are numbered 0, 1, …;
//! an I/O thread [`claim`](Window::claim)s the next chunk (waiting while the window is full),
//! fills it and [`publish`](Window::publish)es it in any order; the writer
//! [`take`](Window::take)s them strictly in order, which frees their slots. One lock round-trip
//! and at most one wake-up per chunk.

use std::sync::{Condvar, Mutex, MutexGuard};

pub(super) struct Window<T> {
    state: Mutex<State<T>>,
    /// A slot was freed (or the window stopped): wakes an I/O thread waiting in `claim`.
    space: Condvar,
    /// The chunk the writer waits for arrived.
    ready: Condvar,
    chunks: usize,
}

struct State<T> {
    /// Next chunk to claim.
    next: usize,
    /// Chunks taken by the writer.
    written: usize,
    /// Chunk `c` waits in slot `c % slots.len()`.
    slots: Vec<Option<T>>,
    /// The chunk the writer is blocked on, if any (so workers wake it only when it matters).
    waiting: Option<usize>,
    stop: bool,
}

impl<T> Window<T> {
    /// A window of `slots` chunks in flight over `chunks` chunks in all.
    pub fn new(slots: usize, chunks: usize) -> Self {
        let state = State { next: 0, written: 0, slots: (0..slots).map(|_| None).collect(), waiting: None, stop: false };
        Window { state: Mutex::new(state), space: Condvar::new(), ready: Condvar::new(), chunks }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next chunk for an I/O thread to fill, once it has a free slot; `None` when every
    /// chunk is claimed or the window stopped.
    pub fn claim(&self) -> Option<usize> {
        let mut w = self.lock();
        loop {
            if w.stop || w.next >= self.chunks {
                return None;
            }
            if w.next < w.written + w.slots.len() {
                break;
            }
            w = self.space.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        w.next += 1;
        Some(w.next - 1)
    }

    /// Hands the filled chunk `c` to the writer.
    pub fn publish(&self, c: usize, chunk: T) {
        let mut w = self.lock();
        let n = w.slots.len();
        w.slots[c % n] = Some(chunk);
        if w.waiting == Some(c) {
            self.ready.notify_one();
        }
    }

    /// The writer's next chunk `c` (chunks are taken in order), waiting until it is published.
    pub fn take(&self, c: usize) -> T {
        let mut w = self.lock();
        let n = w.slots.len();
        loop {
            if let Some(chunk) = w.slots[c % n].take() {
                w.written = c + 1;
                w.waiting = None;
                self.space.notify_one();
                return chunk;
            }
            w.waiting = Some(c);
            w = self.ready.wait(w).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more chunks are claimed (the writer finished or failed); waiting I/O threads return.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.space.notify_all();
    }
}
