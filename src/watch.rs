//! Watching the config file's directory: so that another process's write (a sibling
//! rotator, `pat-rotator set`) wakes the rotation loop at once instead of at its next
//! planned wake-up ([`FileWatch`]), and so that the service's snapshot cache can tell
//! whether the config or state file changed without a `stat` of each per request
//! ([`ChangeFeed`]).
//!
//! Invariants: only events that can change a watched file (creation, rename, deletion, a
//! write) count; readers opening the file many times a second raise none. The kernel queues
//! an event inside the writer's own `rename`/`write` call, before it returns, so a change
//! made before a look began is always seen by that look.

use tracing::warn;

/// Wakes the loop when the config file is replaced or written by someone else
/// (`pat-rotator set`, a sibling rotator). inotify on the file's directory (a rename brings a
/// new inode, so the file itself cannot be watched), written against libc on purpose: the
/// `notify` crate subscribes to every open and read in the directory, and a rotator serving
/// SDK requests reads its own files many times a second; here the kernel delivers only
/// creations, renames, deletions and closes after writing. Without it, changes are seen at
/// the next planned wake-up.
///
/// The descriptor is registered with the event loop only while a wait is running: between
/// waits the loop's own writes (temp files, renames, the state file; about a dozen events a
/// rotation) queue in the kernel without waking the event-loop thread, and the next wait's
/// first poll reads them (epoll reports a descriptor that is already readable when it is
/// added). Registered for good, each of those events cost the idle rotator a wake-up.
#[derive(Debug)]
pub(crate) struct FileWatch {
    fd: Option<std::os::fd::OwnedFd>,
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
        let mask = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE;
        match inotify_on(&dir, mask) {
            Ok(fd) => FileWatch { fd: Some(fd), name },
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; changes by other processes are seen at the next planned wake-up");
                FileWatch { fd: None, name }
            }
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.fd.is_some()
    }

    /// Resolves on an event for the config file's name, or a queue overflow (which may have
    /// lost one), including events queued since the last wait. Cancel-safe: events are read
    /// and judged within one poll.
    pub(crate) async fn changed(&self) {
        use std::os::fd::AsRawFd;
        // A duplicate of the descriptor for this wait alone: dropping it (the wait ends or is
        // cancelled) ends the registration, while the descriptor and its queue stay.
        let registered = self.fd.as_ref().and_then(|fd| {
            let dup = fd.try_clone().ok()?;
            // SAFETY: `dup` is open and owned by the AsyncFd for its whole life.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
            }
            .ok()
        });
        let Some(fd) = registered else {
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
                let events = &buf[..n];
                if event_masks(events).any(|m| m & libc::IN_Q_OVERFLOW != 0)
                    || event_names(events).any(|name| name == self.name.as_encoded_bytes())
                {
                    return;
                }
            }
        }
    }
}

/// A non-blocking inotify descriptor watching `dir` for `mask`.
fn inotify_on(dir: &std::path::Path, mask: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscalls; the fd is owned by OwnedFd from here on.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `path` is a valid C string for the duration of the call.
    if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Whether the config or the state file may have changed since the last look, for the price
/// of one non-blocking `read` of an inotify descriptor (no path walk) instead of a `stat` of
/// each: the snapshot cache asks it on every request. A look returns a generation that moves
/// whenever an event for either name was queued; an event for any other name (lock files,
/// temp files before their rename) does not count.
///
/// Where an event could be missed it is not used at all ([`ChangeFeed::open`] returns
/// `None`, and the cache compares file versions): a file system that is not known to be
/// local (a change made on another host raises no event here), a config file with other
/// hard links (a write through another directory raises none in this one). Once the
/// directory itself is removed or moved, or the watch is dropped, every look reports a
/// change.
pub(crate) struct ChangeFeed {
    fd: std::os::fd::OwnedFd,
    names: [std::ffi::OsString; 2],
    generation: std::sync::atomic::AtomicU64,
    broken: std::sync::atomic::AtomicBool,
}

impl ChangeFeed {
    /// A feed for `config` and `state`, which must share a directory; `None` where events
    /// could be missed (see the type's documentation) or inotify is unavailable.
    pub fn open(config: &std::path::Path, state: &std::path::Path) -> Option<ChangeFeed> {
        use std::os::unix::fs::MetadataExt;
        let dir = config.parent().filter(|d| !d.as_os_str().is_empty())?;
        if state.parent() != Some(dir) || !is_local_file_system(dir) {
            return None;
        }
        if std::fs::symlink_metadata(config).is_ok_and(|m| m.nlink() > 1) {
            return None;
        }
        let mask = libc::IN_CREATE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_MODIFY
            | libc::IN_CLOSE_WRITE
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        let fd = inotify_on(dir, mask).ok()?;
        Some(ChangeFeed {
            fd,
            names: [config.file_name()?.into(), state.file_name()?.into()],
            generation: Default::default(),
            broken: Default::default(),
        })
    }

    /// The generation now, after taking every queued event into account. Callers compare
    /// it with the generation their cached read started at; they must not let two looks
    /// interleave (the snapshot cache looks under its lock), or one could see the other's
    /// events consumed but not yet counted.
    pub(crate) fn generation(&self) -> u64 {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Relaxed) {
            return self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if n < 0 && e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if n < 0 && e.kind() != std::io::ErrorKind::WouldBlock {
                    self.broken.store(true, Ordering::Relaxed);
                    return self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                }
                return self.generation.load(Ordering::Relaxed);
            }
            let events = &buf[..n as usize];
            if event_masks(events).any(|m| {
                m & (libc::IN_DELETE_SELF
                    | libc::IN_MOVE_SELF
                    | libc::IN_IGNORED
                    | libc::IN_UNMOUNT)
                    != 0
            }) {
                self.broken.store(true, Ordering::Relaxed);
            }
            let overflowed = event_masks(events).any(|m| m & libc::IN_Q_OVERFLOW != 0);
            if overflowed
                || self.broken.load(Ordering::Relaxed)
                || event_names(events).any(|name| {
                    self.names
                        .iter()
                        .any(|watched| watched.as_encoded_bytes() == name)
                })
            {
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// File systems whose changes all pass through this kernel (so inotify sees them): ext2-4,
/// XFS, Btrfs, tmpfs, overlayfs (container layers and emptyDir), F2FS.
pub(crate) fn is_local_file_system(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const LOCAL: &[i64] = &[
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // XFS
        0x9123_683E, // Btrfs
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
        0xF2F5_2010, // F2FS
    ];
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the struct we own; `path` is a valid C string.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    LOCAL.contains(&(fs.f_type as i64))
}

/// The masks in a buffer of `struct inotify_event`s.
fn event_masks(buf: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let header = buf.get(offset..offset + 16)?;
        let mask = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
        let len = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]) as usize;
        offset += 16 + len;
        Some(mask)
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A change made by another process, in its own shell.
    fn sh(script: &str, dir: &std::path::Path) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{script}");
    }

    #[test]
    fn a_replacement_a_write_or_a_removal_of_either_file_moves_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (config, state) = (dir.path().join("cfg"), dir.path().join("cfg.state.json"));
        std::fs::write(&config, "[DEFAULT]\n").unwrap();
        let feed = ChangeFeed::open(&config, &state).expect("a local file system");
        let mut last = feed.generation();
        assert_eq!(feed.generation(), last, "nothing happened");
        for script in [
            "printf 'x' > cfg.tmp && mv cfg.tmp cfg", // the atomic replacement
            "printf '{}' > cfg.state.json",           // a state file appears
            "printf 'y' >> cfg",                      // an edit in place
            "chmod 0640 cfg",                         // its mode
            "rm cfg.state.json",                      // a removal
        ] {
            sh(script, dir.path());
            let now = feed.generation();
            assert!(now > last, "not seen: {script}");
            last = now;
        }
        // Lock files, temp files and other names do not count.
        sh("printf 'l' > cfg.lock && printf 't' > other", dir.path());
        assert_eq!(feed.generation(), last);
    }

    /// How many descriptors registered with an epoll instance of this process (the `tfd`
    /// lines of each `anon_inode:[eventpoll]` descriptor's fdinfo; mio holds two
    /// descriptors of its one instance) are inotify descriptors watching `dir` (an `ino:`
    /// of its inode in their own fdinfo).
    fn registered_watches_of(dir: &std::path::Path) -> usize {
        use std::os::unix::fs::MetadataExt;
        let ino = format!("ino:{:x} ", std::fs::metadata(dir).unwrap().ino());
        let fdinfo = |fd: &str| std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"));
        let mut registered = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy() == "anon_inode:[eventpoll]");
            let Some(info) = is_epoll
                .then(|| fdinfo(&entry.file_name().to_string_lossy()).ok())
                .flatten()
            else {
                continue;
            };
            registered.extend(info.lines().filter_map(|l| {
                Some(
                    l.strip_prefix("tfd:")?
                        .split_whitespace()
                        .next()?
                        .to_owned(),
                )
            }));
        }
        registered
            .iter()
            .filter(|fd| fdinfo(fd).is_ok_and(|i| i.contains("inotify wd:") && i.contains(&ino)))
            .count()
    }

    /// Between waits the loop's own writes must not wake its thread: the watch is
    /// registered with the event loop only while a wait runs, and what was queued
    /// meanwhile is read by the next wait, for its file alone.
    #[tokio::test(start_paused = true)]
    async fn the_watch_wakes_only_a_running_wait_and_sees_what_was_queued_before_it() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let watch = FileWatch::new(&dir.path().join("cfg"));
        let wait = || tokio::time::timeout(std::time::Duration::from_secs(3600), watch.changed());
        sh(
            "printf x > other.tmp && mv other.tmp other && rm other",
            dir.path(),
        );
        assert!(wait().await.is_err(), "another file's events are not news");
        sh("printf x > cfg.tmp && mv cfg.tmp cfg", dir.path());
        assert_eq!(
            registered_watches_of(dir.path()),
            0,
            "registered with an event loop between waits"
        );
        assert!(
            wait().await.is_ok(),
            "a replacement made between waits is seen by the next"
        );
        assert!(wait().await.is_err(), "and seen once");
        // While a wait runs, a duplicate of the descriptor is registered; after, none.
        {
            let running = watch.changed();
            tokio::pin!(running);
            let polled = std::future::poll_fn(|cx| {
                std::task::Poll::Ready(running.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(polled, "nothing to see yet");
            assert_eq!(registered_watches_of(dir.path()), 1);
        }
        assert_eq!(registered_watches_of(dir.path()), 0);
    }

    #[test]
    fn a_removed_directory_reports_a_change_at_every_look() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let (config, state) = (dir.join("cfg"), dir.join("cfg.state.json"));
        let feed = ChangeFeed::open(&config, &state).expect("a local file system");
        let before = feed.generation();
        sh("mv d gone", parent.path());
        let first = feed.generation();
        assert!(first > before);
        assert!(
            feed.generation() > first,
            "a broken feed must never say unchanged"
        );
    }

    #[test]
    fn no_feed_where_an_event_could_be_missed() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cfg");
        std::fs::write(&config, "").unwrap();
        std::fs::hard_link(&config, dir.path().join("other-name")).unwrap();
        assert!(ChangeFeed::open(&config, &dir.path().join("cfg.state.json")).is_none());
        let elsewhere = tempfile::tempdir().unwrap();
        assert!(ChangeFeed::open(&dir.path().join("c"), &elsewhere.path().join("s")).is_none());
    }
}
