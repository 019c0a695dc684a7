//! Watching the config file's directory, so that another process's write (a sibling
//! rotator, `pat-rotator set`) wakes the rotation loop at once instead of at its next
//! planned wake-up.
//!
//! Invariant: only events that can change the file (creation, rename, deletion, a close
//! after writing) reach the loop; readers opening the file many times a second raise none.

use tracing::warn;

/// Wakes the loop when the config file is replaced or written by someone else
/// (`pat-rotator set`, a sibling rotator). inotify on the file's directory (a rename brings a
/// new inode, so the file itself cannot be watched), written against libc on purpose: the
/// `notify` crate subscribes to every open and read in the directory, and a rotator serving
/// SDK requests reads its own files many times a second; here the kernel delivers only
/// creations, renames, deletions and closes after writing. Without it, changes are seen at
/// the next planned wake-up.
#[derive(Debug)]
pub(crate) struct FileWatch {
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    name: std::ffi::OsString,
}

impl FileWatch {
    pub(crate) fn new(config: &std::path::Path) -> FileWatch {
        let name = config
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let dir = match config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let _ = std::fs::create_dir_all(&dir);
        match Self::open(&dir) {
            Ok(fd) => FileWatch { fd: Some(fd), name },
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; changes by other processes are seen at the next planned wake-up");
                FileWatch { fd: None, name }
            }
        }
    }

    fn open(
        dir: &std::path::Path,
    ) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain syscalls; the fd is owned by OwnedFd from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path =
            std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        let mask = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE;
        // SAFETY: `path` is a valid C string for the duration of the call.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is open and owned by the AsyncFd for its whole life.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)
    }

    pub(crate) fn is_active(&self) -> bool {
        self.fd.is_some()
    }

    /// Resolves on an event for the config file's name. Cancel-safe: events are read and
    /// judged within one poll.
    pub(crate) async fn changed(&self) {
        use std::os::fd::AsRawFd;
        let Some(fd) = &self.fd else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 4096];
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return std::future::pending().await;
            };
            let read = guard.try_io(|inner| {
                // SAFETY: reads into a buffer we own, at most its length.
                let n =
                    unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(Ok(n)) = read {
                if event_names(&buf[..n]).any(|name| name == self.name.as_encoded_bytes()) {
                    return;
                }
            }
        }
    }
}

/// The file names in a buffer of `struct inotify_event`s (16-byte header, then a
/// NUL-padded name of `len` bytes).
fn event_names(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header = buf.get(offset..offset + 16)?;
        let len = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]) as usize;
        let name = buf.get(offset + 16..offset + 16 + len)?;
        offset += 16 + len;
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        Some(&name[..end])
    })
}
