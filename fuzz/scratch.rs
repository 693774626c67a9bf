//! A per-process scratch directory for a fuzz target, on /dev/shm when it exists (no disk I/O),
//! removed at exit. Directories left by fuzz processes that died (a crash exits with `_exit`)
//! are removed by the next start.

use std::path::PathBuf;
use std::sync::OnceLock;

static ROOT: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn cleanup() {
    if let Some(r) = ROOT.get() {
        let _ = std::fs::remove_dir_all(r);
    }
}

pub fn scratch(target: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let prefix = format!("packds-fuzz-{target}-");
    if let Ok(rd) = std::fs::read_dir(&base) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(&prefix).and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill with signal 0 only checks whether the process exists.
                if unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let root = base.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    ROOT.set(root.clone()).unwrap();
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(cleanup) };
    root
}
