//! The files of the protocol and how they are written: the paths derived from the config
//! path (symlinks resolved once), the version key of a file, and the atomic replacement.
//!
//! Invariant: a file is only ever replaced whole: temp file (exclusive, 0600) in the same
//! directory, write, fsync, rename, fsync of the directory; a crash at any instant leaves
//! the old or the new complete file.
//!
//! Odd files: every file of the protocol is opened without blocking (a FIFO or a device at a
//! path would otherwise hang the open for good, with SIGTERM unable to end it) and used only
//! if it is a regular file; the lock, state, temp and control files are never followed
//! through a symlink (the rotator is often root in a container: a planted link would make it
//! create or chmod someone else's file).

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
    pub(crate) fn for_config(path: &Path) -> Result<Paths, StoreError> {
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
    pub(crate) fn of_path(path: &Path) -> io::Result<Option<FileVersion>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(FileVersion::of(&m))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether a symlink at the path is followed when opening it. Only the config path is (it
/// was resolved once, on purpose, by [`Paths::for_config`]); the protocol's own files never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Follow {
    Yes,
    No,
}

fn open_flags(follow: Follow) -> i32 {
    let nofollow = match follow {
        Follow::Yes => 0,
        Follow::No => libc::O_NOFOLLOW,
    };
    libc::O_NONBLOCK | libc::O_CLOEXEC | nofollow
}

fn refuse_odd(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::other(format!(
            "{} is a symlink; pat-rotator never follows one at its own files: remove it",
            path.display()
        ))
    } else {
        e
    }
}

/// What the error for a FIFO, socket, device or directory at a protocol path says (tests
/// and log readers match on it).
pub const NOT_A_REGULAR_FILE: &str = "is not a regular file";

/// Checks that an open file is a regular file.
fn regular(path: &Path, file: File) -> io::Result<File> {
    let meta = file.metadata()?;
    if meta.is_file() {
        Ok(file)
    } else {
        Err(io::Error::other(format!(
            "{} {NOT_A_REGULAR_FILE} (a FIFO, socket, device or directory); replace it with a regular file",
            path.display()
        )))
    }
}

/// Opens `path` for reading without blocking, and only if it is a regular file; `Ok(None)`
/// when it does not exist.
pub(crate) fn open_regular(path: &Path, follow: Follow) -> io::Result<Option<File>> {
    open_regular_as(path, follow, false)
}

/// [`open_regular`], for writing too when `write` (an OFD write lock needs it).
fn open_regular_as(path: &Path, follow: Follow, write: bool) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(open_flags(follow))
        .open(path)
    {
        Ok(f) => regular(path, f).map(Some),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(refuse_odd(path, e)),
    }
}

/// Reads at most `cap` bytes of a regular file (never following a symlink at `path`):
/// `Ok(None)` when absent, an error when it is larger (a huge file must not cost memory).
pub(crate) fn read_capped(path: &Path, follow: Follow, cap: u64) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let Some(file) = open_regular(path, follow)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(io::Error::other(format!(
            "{} is larger than {cap} bytes; it is not a file pat-rotator wrote",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// Opens a lock file read-only (`flock` needs no write access), creating it 0600 if missing,
/// never through a symlink and never a FIFO. Read-only matters: a close after writing is
/// what the rotator's directory watch wakes for, and readers lock this file many times a
/// second.
pub(crate) fn open_lock(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(f) = open_regular_as(path, Follow::No, write)? {
        return Ok(f);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir)?;
    }
    // O_EXCL never follows a symlink, dangling or not.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(open_flags(Follow::No))
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(refuse_odd(path, e)),
    }
    open_regular_as(path, Follow::No, write)?
        .ok_or_else(|| io::Error::new(ErrorKind::NotFound, "the lock file vanished"))
}

/// The rotation lock of one profile: an exclusive OFD lock on one byte of
/// `<config>.rotate.lock`, at an offset derived from the profile name. Rotators of one
/// profile exclude each other; rotators of other profiles of the same file never wait on
/// each other's mint (a whole-file `flock`, which is all fd-lock offers, made a neighbour's
/// forced rotation wait out another profile's slow provider call). Held until dropped: the
/// lock belongs to the open file description, which closing the file releases, whatever
/// ends the process.
#[derive(Debug)]
pub(crate) struct ProfileLock {
    _file: File,
}

/// Where a profile's byte lies in the rotation lock file. Two profiles whose offsets collide
/// (a 1 in 2^31 chance) only wait on each other, as every profile did before.
pub(crate) fn profile_offset(profile: &str) -> libc::off_t {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(profile.as_bytes());
    libc::off_t::from(u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) >> 1)
}

/// Takes `profile`'s rotation lock in `file` (opened for writing) without waiting:
/// `Ok(Err(file))` when another process (or another open of the file in this one) holds it,
/// so the caller can try again on the same open file.
pub(crate) fn try_profile_lock(file: File, profile: &str) -> io::Result<Result<ProfileLock, File>> {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = libc::F_WRLCK as libc::c_short;
    range.l_whence = libc::SEEK_SET as libc::c_short;
    range.l_start = profile_offset(profile);
    range.l_len = 1;
    // SAFETY: F_OFD_SETLK reads the `flock` we pass and touches nothing else; the fd is open
    // for writing (a write lock needs it) for as long as `file` lives.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &range) };
    if rc == 0 {
        return Ok(Ok(ProfileLock { _file: file }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(Err(file)),
        _ => Err(e),
    }
}

/// A warning when `dir` (the config file's directory) is writable by group or others: then
/// they can replace the config file, plant files beside it, or forge the control file.
pub(crate) fn directory_warning(dir: &Path) -> Option<String> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mode = fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    (mode & 0o022 != 0).then(|| {
        format!(
            "the config directory {} is writable by group or others (mode {mode:04o}): they can replace the token file or forge files beside it, and the control file is not published there; run `chmod go-w {}` or move DATABRICKS_CONFIG_FILE to a private directory",
            dir.display(),
            dir.display()
        )
    })
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

/// Creates `dir` (and its parents) if missing, 0700 like `~/.databricks`: a directory the
/// rotator recreates holds the token and its protocol files. An existing one is left as is.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The directory a file of the protocol lives in (`.` for a bare name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn atomic_write_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = dir_of(path);
    create_private_dir(dir).map_err(io_err("create directory", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(dir)
        .map_err(io_err("create a temp file in", dir))?;
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
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    Ok(())
}
