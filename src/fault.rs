//! Test-only fault injection, compiled in only with the cargo feature `fault-injection`.
//!
//! The environment variable `PACKDS_FAULT=WHAT:N` is read once per process (at the first
//! check); the tests set it for `packds` subprocesses. Switches:
//! - `kill-after-shards:N`, `kill-after-files:N`: a pack kills itself with SIGKILL (as a node
//!   failure would) after its N-th shard or file;
//! - `kill-in-h5-shard:N`: after the N-th HDF5 shard skeleton is written, before its data;
//! - `pack-slow-us:N`: every file read of a pack (and stat of a plan) takes N µs longer (to
//!   reach its middle);
//! - `kill-before-remove:N` (`--remove-source`): after the N-th shard of the run is renamed into
//!   place, before it is read back and checked (so before any of its sources is removed);
//! - `kill-in-remove:N` (`--remove-source`): right after the N-th source file removal of the run;
//! - `kill-before-manifest:1`: a pack is killed after its last shard (and, with
//!   `--remove-source`, after every removal and rmdir), before the final index and manifest;
//! - `kill-in-merge:N`: `merge` is killed right after moving its N-th shard;
//! - `stage-kill-after-bytes:N`: staging is killed once N bytes were copied;
//! - `stage-slow-ms:N`: staging sleeps N ms after each 8 MiB copied (to signal a copy mid-way);
//! - `cache-kill-after-bytes:N`: a shard cache fetch (`ShardCache.fetch`) is killed once N bytes
//!   of the shard were copied into its temporary file (checked after each 512 KiB chunk);
//! - `kill-in-append:N`: `pack --append` is killed after its work pack (1), after moving its
//!   first new shard into the dataset (2), or after writing the new index (3);
//! - `step-slow-ms:N`: every step of verify, unpack, merge and index (each read, file or shard,
//!   where they check for cancellation) takes N ms longer: to watch their progress lines and
//!   to cancel them mid-way.
//!
//! Without the feature every function here is an inline no-op and nothing reads the environment.

/// Whether this build has fault injection (exposed to Python as `_core.FAULT_INJECTION`).
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub const ENABLED: bool = cfg!(feature = "fault-injection");

#[cfg(feature = "fault-injection")]
mod on {
    use std::sync::OnceLock;

    /// The parsed `PACKDS_FAULT` (at most one switch is set).
    #[derive(Default, Debug, PartialEq)]
    pub(super) struct Faults {
        pub kill_after_shards: Option<u64>,
        pub kill_after_files: Option<u64>,
        pub kill_in_h5_shard: Option<u64>,
        pub pack_slow_us: Option<u64>,
        pub kill_before_remove: Option<u64>,
        pub kill_in_remove: Option<u64>,
        pub kill_before_manifest: Option<u64>,
        pub kill_in_merge: Option<u64>,
        pub stage_kill_after_bytes: Option<u64>,
        pub stage_slow_ms: Option<u64>,
        pub step_slow_ms: Option<u64>,
        pub kill_in_append: Option<u64>,
        pub cache_kill_after_bytes: Option<u64>,
    }

    pub(super) fn parse(v: &str) -> Faults {
        let mut f = Faults::default();
        if let Some((what, n)) = v.split_once(':') {
            let n = n.parse().ok();
            match what {
                "kill-after-shards" => f.kill_after_shards = n,
                "kill-after-files" => f.kill_after_files = n,
                "kill-in-h5-shard" => f.kill_in_h5_shard = n,
                "pack-slow-us" => f.pack_slow_us = n,
                "kill-before-remove" => f.kill_before_remove = n,
                "kill-in-remove" => f.kill_in_remove = n,
                "kill-before-manifest" => f.kill_before_manifest = n,
                "kill-in-merge" => f.kill_in_merge = n,
                "stage-kill-after-bytes" => f.stage_kill_after_bytes = n,
                "stage-slow-ms" => f.stage_slow_ms = n,
                "step-slow-ms" => f.step_slow_ms = n,
                "kill-in-append" => f.kill_in_append = n,
                "cache-kill-after-bytes" => f.cache_kill_after_bytes = n,
                _ => {}
            }
        }
        f
    }

    pub(super) fn get() -> &'static Faults {
        static F: OnceLock<Faults> = OnceLock::new();
        F.get_or_init(|| std::env::var("PACKDS_FAULT").map(|v| parse(&v)).unwrap_or_default())
    }

    /// Kills the process (SIGKILL, as a node failure would) when `limit` is `Some(count)`.
    pub(super) fn kill_at(limit: Option<u64>, count: u64) {
        if limit == Some(count) {
            kill();
        }
    }

    pub(super) fn kill() {
        // SAFETY: raising a signal in our own process.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// A pack completed its `k`-th shard (counted from 1 within this run).
#[inline(always)]
pub fn kill_after_shards(k: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_after_shards, k);
    #[cfg(not(feature = "fault-injection"))]
    let _ = k;
}

/// A pack wrote its `n`-th file (counted from 1 within this run).
#[inline(always)]
pub fn kill_after_files(n: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_after_files, n);
    #[cfg(not(feature = "fault-injection"))]
    let _ = n;
}

/// The skeleton of HDF5 shard number `k` (counted from 1) was written; its data was not.
#[inline(always)]
pub fn kill_in_h5_shard(k: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_in_h5_shard, k);
    #[cfg(not(feature = "fault-injection"))]
    let _ = k;
}

/// `--remove-source`: the `k`-th shard of this run (counted from 1) was renamed into place; it
/// was not read back yet and none of its sources was removed.
#[inline(always)]
pub fn kill_before_remove(k: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_before_remove, k);
    #[cfg(not(feature = "fault-injection"))]
    let _ = k;
}

/// `--remove-source`: the `n`-th source file of this run (counted from 1) was removed.
#[inline(always)]
pub fn kill_in_remove(n: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_in_remove, n);
    #[cfg(not(feature = "fault-injection"))]
    let _ = n;
}

/// A pack wrote every shard (and removed its sources), before the final index and manifest.
#[inline(always)]
pub fn kill_before_manifest() {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_before_manifest, 1);
}

/// A merge moved its `n`-th shard.
#[inline(always)]
pub fn kill_in_merge(n: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_in_merge, n);
    #[cfg(not(feature = "fault-injection"))]
    let _ = n;
}

/// Before a pack reads a file, or a plan stats one.
#[inline(always)]
pub fn slow_read() {
    #[cfg(feature = "fault-injection")]
    if let Some(us) = on::get().pack_slow_us {
        std::thread::sleep(std::time::Duration::from_micros(us));
    }
}

/// `pack --append` reached commit step `n` (see the module docs).
#[inline(always)]
pub fn kill_in_append(n: u64) {
    #[cfg(feature = "fault-injection")]
    on::kill_at(on::get().kill_in_append, n);
    #[cfg(not(feature = "fault-injection"))]
    let _ = n;
}

/// A step of verify, unpack, merge or index (where it checks for cancellation).
#[inline(always)]
pub fn slow_step() {
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = on::get().step_slow_ms {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Staging copied another 8 MiB (or finished a file); `copied` bytes in all so far.
#[inline(always)]
pub fn stage_copied(copied: u64) {
    #[cfg(feature = "fault-injection")]
    {
        let f = on::get();
        if let Some(ms) = f.stage_slow_ms {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if f.stage_kill_after_bytes.is_some_and(|k| copied >= k) {
            on::kill();
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = copied;
}

/// A shard cache fetch copied `copied` bytes of its shard so far.
#[inline(always)]
pub fn cache_copied(copied: u64) {
    #[cfg(feature = "fault-injection")]
    if on::get().cache_kill_after_bytes.is_some_and(|k| copied >= k) {
        on::kill();
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = copied;
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::on::*;

    #[test]
    fn parses_one_switch() {
        assert_eq!(parse("kill-after-shards:3"), Faults { kill_after_shards: Some(3), ..Faults::default() });
        assert_eq!(parse("stage-slow-ms:20"), Faults { stage_slow_ms: Some(20), ..Faults::default() });
        assert_eq!(parse("kill-in-remove:7"), Faults { kill_in_remove: Some(7), ..Faults::default() });
        assert_eq!(parse("cache-kill-after-bytes:1"), Faults { cache_kill_after_bytes: Some(1), ..Faults::default() });
        assert_eq!(parse("kill-in-merge:x"), Faults::default());
        assert_eq!(parse("nonsense"), Faults::default());
    }
}
