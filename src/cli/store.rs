//! Which credential store a command works on: `PAT_STORE` is turned into a store here and
//! nowhere else. A command says what it does with a store (a [`StoreWork`]); this module
//! opens the configured backend, runs the work on it, and stops the backend's own tasks
//! after (the cluster store releases its Lease then, so a successor takes over at once).
//! Adding a backend is one arm here, its own folder, and the docs.

use super::{exit, CliError};
use crate::cluster::KubeStore;
use crate::config::StoreKind;
use crate::shared::Shared;
use crate::store::CredentialStore;
use tokio_util::sync::CancellationToken;

/// What a command does with the store, whichever backend it is.
pub(super) trait StoreWork {
    type Output;
    async fn run<S: CredentialStore>(self, shared: Shared, store: S) -> Self::Output;
}

/// Opens the store `PAT_STORE` names, runs `work` on it, then stops the backend's tasks.
pub(super) async fn with_store<W: StoreWork>(
    shared: Shared,
    work: W,
) -> Result<W::Output, CliError> {
    match shared.config.store.clone() {
        StoreKind::File => {
            // A turn's read waits as briefly as serving does: past that it decides from what
            // it read last (the rotation reads again before it mints), so a lock that is
            // never let go costs no token, and its wait does not add to the stall wait of
            // the rotation lock, which the same stopped writer usually holds too.
            let store = shared
                .store
                .clone()
                .with_write_wait(shared.config.write_lock_wait)
                .with_read_wait(crate::shared::LOCKED_READ_WAIT);
            Ok(work.run(shared, store).await)
        }
        StoreKind::Kubernetes(target) => {
            let stop = CancellationToken::new();
            let (store, tasks) = KubeStore::start(shared.clone(), target, stop.clone())
                .await
                .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
            let out = work.run(shared, store).await;
            stop.cancel();
            let _ = tasks.await;
            Ok(out)
        }
    }
}

/// Where the credential lives when it is not this process's config file, and how to seed it
/// there (`set` writes the file, so it refuses then); `None` for the file store.
pub(super) fn kept_elsewhere(cfg: &crate::config::Config) -> Option<String> {
    match &cfg.store {
        StoreKind::File => None,
        StoreKind::Kubernetes(target) => Some(crate::cluster::how_to_seed(target)),
    }
}
