//! The reader: the current token for programs that use it, never a stale one.
//!
//! Invariant: every call to [`Reader::token`] checks the file with one `stat` (device,
//! inode, size, mtime and ctime with nanoseconds). A hit returns the cached token; any
//! change re-reads the file under the shared lock. There is no time-based cache: the stale
//! read incident came from one. A replacement within the same mtime tick is still seen,
//! because a rename always brings a new inode.

use crate::store::{FileVersion, Store, StoreError};
use crate::Token;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug)]
struct Cached {
    key: Option<FileVersion>,
    token: Option<Token>,
}

/// A cached, always-fresh view of one profile's token.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    store: Store,
    cache: Mutex<Option<Cached>>,
    /// How many times the file was read (not just `stat`ed): what the cache saves.
    reloads: std::sync::atomic::AtomicU64,
}

impl Reader {
    pub fn new(config: &Path, profile: &str) -> Result<Reader, StoreError> {
        Ok(Reader {
            path: config.to_path_buf(),
            store: Store::open(config, profile)?,
            cache: Mutex::new(None),
            reloads: Default::default(),
        })
    }

    /// The current token, or `None` when the file or the profile's token is absent.
    pub fn token(&self) -> Result<Option<Token>, StoreError> {
        let key = FileVersion::of_path(&self.path).map_err(|e| StoreError::Io {
            action: "stat",
            path: self.path.clone(),
            source: e,
        })?;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = cache.as_ref() {
            if c.key == key {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.reload()?;
        let token = fresh.token.clone();
        *cache = Some(fresh);
        Ok(token)
    }

    /// Reads under the shared lock, keyed by the `fstat` of the very file it read, so the
    /// cache can never pair an old key with new content or the reverse.
    fn reload(&self) -> Result<Cached, StoreError> {
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (token, key) = self.store.read_token_versioned()?;
        Ok(Cached { key, token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sees_every_replacement_even_within_one_mtime_tick() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        let store = Store::open(&cfg, "DEFAULT").unwrap();
        let reader = Reader::new(&cfg, "DEFAULT").unwrap();
        assert_eq!(reader.token().unwrap(), None);
        let mut prev: Option<Token> = None;
        for i in 0..200 {
            let t = Token::new(format!("tok-{i}"));
            store
                .swap(
                    prev.as_ref(),
                    &t,
                    None,
                    Duration::from_secs(1),
                    None,
                    &chrono::Utc::now,
                )
                .unwrap();
            // Same length, same second: only the inode tells them apart.
            assert_eq!(reader.token().unwrap().as_ref(), Some(&t));
            prev = Some(t);
        }
    }

    #[test]
    fn cache_hit_returns_the_same_token_without_rereading() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        std::fs::write(&cfg, "[DEFAULT]\ntoken = a\n").unwrap();
        let reader = Reader::new(&cfg, "DEFAULT").unwrap();
        assert_eq!(reader.token().unwrap(), Some(Token::new("a")));
        let reloads = || reader.reloads.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reloads(), 1);
        for _ in 0..5 {
            assert_eq!(reader.token().unwrap(), Some(Token::new("a")));
        }
        assert_eq!(reloads(), 1, "an unchanged file was read again");
        crate::store::atomic_write(&cfg, b"[DEFAULT]\ntoken = b\n").unwrap();
        assert_eq!(reader.token().unwrap(), Some(Token::new("b")));
        assert_eq!(reloads(), 2, "a replaced file is read once");
        std::fs::remove_file(&cfg).unwrap();
        assert_eq!(reader.token().unwrap(), None);
    }

    #[test]
    fn an_oversized_file_is_refused_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        let mut text = String::from("[DEFAULT]\ntoken = a\n");
        text.push_str(&"; padding\n".repeat((crate::store::MAX_CONFIG_BYTES / 10 + 1) as usize));
        std::fs::write(&cfg, text).unwrap();
        let reader = Reader::new(&cfg, "DEFAULT").unwrap();
        assert!(matches!(reader.token(), Err(StoreError::TooLarge { .. })));
    }
}
