//! The files of the protocol and how they are written: the paths derived from the config
//! path (symlinks resolved once), the version key of a file, and the atomic replacement.
//!
//! Invariant: a file is only ever replaced whole: temp file (exclusive, 0600) in the same
//! directory, write, fsync, rename, fsync of the directory; a crash at any instant leaves
//! the old or the new complete file.

use super::{io_err, StoreError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The four files the protocol uses, derived from the config path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config: PathBuf,
    pub lock: PathBuf,
    pub rotate_lock: PathBuf,
    pub state: PathBuf,
    /// `<config>.control.json`: the capability URLs of the running service (0600).
    pub control: PathBuf,
}

impl Paths {
    pub fn for_config(path: &Path) -> Result<Paths, StoreError> {
        let config = resolve_symlink(path)?;
        let with_suffix = |suffix: &str| {
            let mut s = config.clone().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        Ok(Paths {
            lock: with_suffix(".lock"),
            rotate_lock: with_suffix(".rotate.lock"),
            state: with_suffix(".pat-rotator.json"),
            control: with_suffix(".control.json"),
            config,
        })
    }
}

fn resolve_symlink(path: &Path) -> Result<PathBuf, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => match fs::canonicalize(path) {
            Ok(target) => Ok(target),
            Err(_) => {
                let target = fs::read_link(path).map_err(io_err("read symlink", path))?;
                Err(StoreError::DanglingSymlink {
                    path: path.to_path_buf(),
                    target,
                })
            }
        },
        _ => Ok(path.to_path_buf()),
    }
}

/// What identifies one version of a file (device, inode, size, mtime and ctime with
/// nanoseconds): the one "has it changed" key of the reader cache, the service's snapshot
/// cache and the directory watch. A replacement within one mtime tick is still seen, because
/// a rename always brings a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    pub fn of(m: &fs::Metadata) -> FileVersion {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The version now; `None` when the file is absent or cannot be examined.
    pub fn current(path: &Path) -> Option<FileVersion> {
        FileVersion::of_path(path).ok().flatten()
    }

    /// `Ok(None)` when the file does not exist.
    pub fn of_path(path: &Path) -> io::Result<Option<FileVersion>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(FileVersion::of(&m))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

pub(super) trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

pub(super) fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp-")
}

/// Removes temp files a crashed writer left behind. Only called under the exclusive lock,
/// and only writers holding that lock create temp files, so none of these is in use.
pub(super) fn remove_stale_temps(path: &Path) {
    let Some(dir) = path.parent() else { return };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = temp_prefix(path);
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Replaces `path` whole: temp file (exclusive, 0600, random name) in the same directory,
/// write, fsync, rename, fsync the directory. An existing file's mode is kept.
pub fn atomic_write(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    atomic_write_mode(path, contents, mode)
}

/// [`atomic_write`] for a file only its owner may read, whatever mode it had before.
pub fn atomic_write_private(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    atomic_write_mode(path, contents, 0o600)
}

fn atomic_write_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(&dir)
        .map_err(io_err("create a temp file in", &dir))?;
    tmp.write_all(contents)
        .map_err(io_err("write", tmp.path()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set permissions on", path))?;
    tmp.as_file().sync_all().map_err(io_err("fsync", path))?;
    tmp.persist(path).map_err(|e| {
        if e.error.raw_os_error() == Some(libc::EBUSY) {
            StoreError::RenameBusy {
                path: path.to_path_buf(),
            }
        } else {
            io_err("rename onto", path)(e.error)
        }
    })?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", &dir))?;
    Ok(())
}
