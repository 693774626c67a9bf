//! A guard against SIGBUS from shard mappings.
//!
//! Reading a page of a mapped file beyond its current end raises SIGBUS, which kills the
//! process: that happens when a shard is truncated or overwritten in place while a reader has
//! it mapped (packds never does that, but a user's `cp` or `truncate` over a dataset in use
//! can). packds registers each shard mapping here and installs, once, a SIGBUS handler that
//! acts only on faults inside a registered mapping: it maps a zero page over the faulting page
//! (so the interrupted copy completes) and marks the mapping as damaged; the reader checks the
//! mark after each read and raises `FormatError` instead of returning those bytes. Every other
//! SIGBUS goes on to the handler that was installed before (Python's `faulthandler`, or the
//! default action: the process dies as it would have).
//!
//! The handler is async-signal-safe: it reads a fixed table of atomics (no locks, no
//! allocation) and calls only `mmap` and `sigaction`. Limits: [`SLOTS`] mappings at once
//! (more are simply not guarded); `ds.view()` uses Python's own `mmap` objects, which are not
//! guarded; a `faulthandler` enabled after packds installed its handler takes precedence.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::Once;

/// How many mappings can be guarded at once.
pub const SLOTS: usize = 1 << 14;

struct Slot {
    /// Start address; 0 = free, 1 = being filled.
    start: AtomicUsize,
    len: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { start: AtomicUsize::new(0), len: AtomicUsize::new(0), hit: AtomicBool::new(false) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours (written once, before our handler can run).
static mut PREV: Option<libc::sigaction> = None;

/// A registered mapping; unregisters on drop (drop it before unmapping).
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Did a read of this mapping fault (the file shrank under it)?
    #[inline]
    pub fn tripped(&self) -> bool {
        self.slot.is_some_and(|s| TABLE[s].hit.load(Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            TABLE[s].start.store(0, Release);
        }
    }
}

/// Registers the mapping `[ptr, ptr + len)`; installs the handler on first use.
pub fn register(ptr: *const u8, len: usize) -> Guard {
    page_size(); // cached now: the handler must not be the first to ask
    INSTALL.call_once(install);
    let start = ptr as usize;
    if start <= 1 || len == 0 {
        return Guard { slot: None };
    }
    for (i, s) in TABLE.iter().enumerate() {
        if s.start.compare_exchange(0, 1, AcqRel, Relaxed).is_ok() {
            s.len.store(len, Release);
            s.hit.store(false, Release);
            s.start.store(start, Release);
            return Guard { slot: Some(i) };
        }
    }
    Guard { slot: None }
}

fn install() {
    // SAFETY: plain sigaction calls with zeroed, then filled, structs; PREV is written here
    // once, before our handler is installed, and only read by the handler afterwards.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
            return;
        }
        *std::ptr::addr_of_mut!(PREV) = Some(old);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = page_size();
    for s in TABLE.iter() {
        let start = s.start.load(Acquire);
        if start > 1 && addr >= start && addr - start < s.len.load(Acquire) {
            let p = addr & !(page - 1);
            // SAFETY: replaces one page inside our own mapping with a private zero page; the
            // range stays mapped, so the interrupted read completes and reads zeros.
            let r = unsafe { libc::mmap(p as *mut libc::c_void, page, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0) };
            if r != libc::MAP_FAILED {
                s.hit.store(true, Release);
                return;
            }
        }
    }
    // Not ours: what would have happened without packds.
    // SAFETY: PREV was written before this handler was installed.
    let prev = unsafe { *std::ptr::addr_of!(PREV) };
    match prev {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: a handler installed by someone else, called as the kernel would.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: as above, for a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Default action: restore it and return; the faulting access runs again and the
            // process dies of SIGBUS as it would have.
            // SAFETY: async-signal-safe calls with a zeroed struct.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = libc::SIG_DFL;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
        }
    }
}

fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let p = PAGE.load(Relaxed);
    if p != 0 {
        return p;
    }
    // SAFETY: sysconf is async-signal-safe; register() calls this before any fault can reach
    // the handler, so the handler only reads the cached value.
    let p = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    PAGE.store(p, Relaxed);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_shard_truncated_under_its_mapping_trips_the_guard_instead_of_killing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&vec![7u8; 64 << 10]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        // SAFETY: a test mapping of a file this test owns.
        let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let g = register(m.as_ptr(), m.len());
        page_size();
        assert_eq!(m[100], 7);
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(4096).unwrap();
        let v: u32 = m[8192..16384].iter().map(|&b| u32::from(b)).sum(); // past the new end
        assert_eq!(v, 0);
        assert!(g.tripped());
        assert_eq!(m[100], 7, "pages before the new end are intact");
        drop(g);
    }
}
