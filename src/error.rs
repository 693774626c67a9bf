//! One error type for the core. Each variant carries what a user needs to act on it.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed on `path`.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The disk (or quota) is full while writing `path`.
    #[error("no space left on device while writing {}", path.display())]
    NoSpace { path: PathBuf },

    /// A file that is not a valid packds dataset/index/shard, or a damaged one.
    #[error("{}: {what}", path.display())]
    Format { path: PathBuf, what: String, hint: Option<&'static str> },

    /// A sample's or shard's bytes do not match the recorded checksum.
    #[error("checksum mismatch for {key} in {}", shard.display())]
    Checksum { key: String, shard: PathBuf },

    /// A user error that is not about a file's contents (bad arguments, existing output, ...).
    #[error("{msg}")]
    Usage { msg: String, hint: Option<String> },

    /// A file changed while it was being packed.
    #[error("{} changed while it was read ({what})", path.display())]
    Changed { path: PathBuf, what: String },

    /// A sample key given twice to one writer (Python: `DuplicateKeyError`, a `KeyError` too).
    #[error("duplicate sample key {key:?}")]
    DuplicateKey { key: String },

    /// An archive member would be written outside the destination.
    #[error("refusing to write {member:?}: {why}")]
    Escape { member: String, why: &'static str },

    /// The operation was cancelled (Ctrl-C / SIGTERM).
    #[error("interrupted")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an `io::Error` with the operation and path; ENOSPC/EDQUOT become `NoSpace`.
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace { path },
            _ => Error::Io { op, path, source },
        }
    }

    pub fn format(path: impl AsRef<Path>, what: impl Into<String>) -> Error {
        Error::Format { path: path.as_ref().to_path_buf(), what: what.into(), hint: None }
    }

    /// A format error with a specific hint (instead of the generic one).
    pub fn format_hint(path: impl AsRef<Path>, what: impl Into<String>, hint: &'static str) -> Error {
        Error::Format { path: path.as_ref().to_path_buf(), what: what.into(), hint: Some(hint) }
    }

    pub fn usage(msg: impl Into<String>, hint: impl Into<String>) -> Error {
        Error::Usage { msg: msg.into(), hint: Some(hint.into()) }
    }

    /// An option value that is not one of the accepted ones (`--format zip`): names the option,
    /// the value and every accepted value.
    pub fn bad_choice(option: &str, value: &str, verb: &str, accepted: &str) -> Error {
        Error::usage(format!("{option} {value:?} is not {verb}; accepted values: {accepted}"), format!("use {accepted}"))
    }

    /// What to do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Usage { hint, .. } => hint.clone(),
            Error::NoSpace { .. } => {
                Some("free space (or quota) there, or write elsewhere; an interrupted pack keeps its completed shards: rerun it with --resume".into())
            }
            Error::Format { hint: Some(h), .. } => Some((*h).to_string()),
            Error::Format { .. } => Some(
                "the dataset is damaged or incomplete: re-run `packds pack` (with --resume if it was interrupted), or `packds verify` to see what is wrong"
                    .into(),
            ),
            Error::Checksum { .. } => Some("the data on disk is damaged: copy or pack the dataset again".into()),
            Error::Changed { .. } => Some("pack from a tree that is not being modified, or pass --on-error skip".into()),
            // Writing (the output side): the input-side advice below (--on-error skip) does not apply.
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EROFS) => {
                Some("that filesystem is mounted read-only: write the output elsewhere".into())
            }
            Error::Io { op, source, .. } if source.kind() == io::ErrorKind::PermissionDenied && is_write_op(op) => {
                Some("the destination is not writable by you: fix its permissions, or write the output elsewhere".into())
            }
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENAMETOOLONG) => Some(
                "the path is longer than the system allows (PATH_MAX 4096 bytes): pack from a directory nearer to it, or pass --on-error skip to leave it out"
                    .into(),
            ),
            Error::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                Some("fix the permissions, or pass --on-error skip to leave such files out".into())
            }
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => Some("check the path".into()),
            Error::DuplicateKey { .. } => Some("every key is written once: give each sample its own key".into()),
            Error::Escape { .. } => Some("nothing was written for that member; the dataset may be hostile: inspect it with `packds ls`".into()),
            _ => None,
        }
    }
}

/// Operations that write (create, replace or remove) rather than read the input.
fn is_write_op(op: &str) -> bool {
    matches!(op, "create directory" | "create" | "write" | "rename" | "fsync" | "remove" | "truncate" | "chmod")
}

/// Shorthand: `.ctx("open", path)` on an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_side_permission_and_read_only_hints_do_not_suggest_on_error_skip() {
        let denied = || io::Error::from_raw_os_error(libc::EACCES);
        let w = Error::io("create directory", "/x/o.pds", denied()).hint().unwrap();
        assert!(w.contains("write the output elsewhere") && !w.contains("--on-error"), "{w}");
        let r = Error::io("open", "/src/a", denied()).hint().unwrap();
        assert!(r.contains("--on-error skip"), "{r}");
        let ro = Error::io("create", "/ro/o.pds/x", io::Error::from_raw_os_error(libc::EROFS)).hint().unwrap();
        assert!(ro.contains("read-only"), "{ro}");
        let long = Error::io("stat", "/a/b", io::Error::from_raw_os_error(libc::ENAMETOOLONG)).hint().unwrap();
        assert!(long.contains("PATH_MAX") && long.contains("--on-error skip"), "{long}");
    }
}
