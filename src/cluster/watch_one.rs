//! One long-lived watch of a single named object (the Secret, the Lease), shared by the
//! mirror and the election: what a watch that lasts for days needs, in one place.
//!
//! Why by hand rather than kube-runtime's `watcher`: one named object starts from a `get` or
//! from the server's cache (not a `list`), a broken stream must be reported to the caller
//! at once (the election then falls back to reading the Lease, the mirror to reading the
//! Secret), and the retry interval is the caller's (within a lease period), not a backoff
//! of tens of seconds.
//!
//! Invariant: `resume` only ever takes a version the server sent on this watch (an object's
//! or a bookmark's), so a watch request that ends at its timeout is re-issued from where it
//! stopped: a quiet object costs one request per [`watch_seconds`], and is never read again
//! unless the server says the version is gone (410) or the stream broke.

use super::{ClusterError, KubeStore};
use futures_util::StreamExt;
use kube::api::{Api, WatchParams};
use kube::core::WatchEvent;
use kube::Resource;
use serde::de::DeserializeOwned;
use std::future::Future;

/// How one watch request ended.
#[derive(Debug)]
pub(super) enum WatchEnd {
    /// The server closed it at its timeout: re-issue it from `resume`.
    Closed,
    /// The version is too old to resume from (410), or the server ended the watch with an
    /// error status: read the object again.
    Reread,
    /// The object was deleted.
    Deleted,
    /// The request or the stream failed (classified).
    Failed(ClusterError),
    /// `stop` completed first (cancelled, or the caller knows the stream is stale).
    Stopped,
}

/// How long one watch request lasts: about five minutes, spread over a minute so that a
/// fleet started at once does not re-issue its watches in step.
pub(super) fn watch_seconds() -> u32 {
    rand::random_range(240..=300)
}

impl KubeStore {
    /// Watches the object `name` of `api` from version `resume` (`"0"`: from the server's
    /// cache, which sends the current object first) until the request ends or `stop`
    /// completes, passing each new version of the object to `seen`. `opened` runs once the
    /// server accepted the request.
    pub(super) async fn watch_one<K, Fut>(
        &self,
        api: &Api<K>,
        name: &str,
        resume: &mut String,
        stop: impl Future<Output = ()>,
        opened: impl FnOnce(),
        mut seen: impl FnMut(K) -> Fut,
    ) -> WatchEnd
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let resource = format!("{}/{name}", K::plural(&()));
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(watch_seconds());
        let mut stop = std::pin::pin!(stop);
        let open = self.call("watch", &resource, api.watch(&params, resume));
        let stream = tokio::select! {
            _ = &mut stop => return WatchEnd::Stopped,
            s = open => match s {
                Ok(s) => s,
                Err(e) => return WatchEnd::Failed(e),
            },
        };
        opened();
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                _ = &mut stop => return WatchEnd::Stopped,
                e = stream.next() => e,
            };
            match event {
                Some(Ok(WatchEvent::Added(obj) | WatchEvent::Modified(obj))) => {
                    if let Some(v) = obj.meta().resource_version.clone() {
                        *resume = v;
                    }
                    seen(obj).await;
                }
                Some(Ok(WatchEvent::Bookmark(b))) => {
                    *resume = b.metadata.resource_version;
                }
                Some(Ok(WatchEvent::Deleted(_))) => return WatchEnd::Deleted,
                Some(Ok(WatchEvent::Error(status))) => {
                    tracing::debug!(code = status.code, resource = %resource, "the watch ended with an error status; reading again");
                    return WatchEnd::Reread;
                }
                Some(Err(e)) => return WatchEnd::Failed(self.classify("watch", &resource, e)),
                None => return WatchEnd::Closed,
            }
        }
    }
}
