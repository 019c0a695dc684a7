//! `pat-rotator once`: one decision, one rotation if due.

use super::{exit, provider_for, runtime, CliError};
use crate::cluster::KubeStore;
use crate::config::{Config, StoreKind};
use crate::rotator::{RotationOutcome, Rotator};
use crate::service::Shared;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct OnceArgs {
    /// Rotate even if not due.
    #[arg(long)]
    force: bool,
}

pub(super) fn execute(cfg: Config, args: OnceArgs) -> Result<i32, CliError> {
    runtime()?.block_on(once(cfg, args.force))
}

/// `pat-rotator once`: exit 0 rotated, 3 nothing due.
async fn once(cfg: Config, force: bool) -> Result<i32, CliError> {
    let provider = Arc::new(provider_for(&cfg)?);
    let shared = Shared::new(cfg)?;
    let outcome = match shared.config.store.clone() {
        StoreKind::File => Rotator::new(shared, provider).once(force).await?,
        StoreKind::Kubernetes(target) => {
            // One decision as a replica: it rotates only if it wins the Lease, and releases
            // the Lease when done.
            let cancel = CancellationToken::new();
            let (store, cluster) = KubeStore::start(shared.clone(), target, cancel.clone())
                .await
                .map_err(|e| CliError::new(exit::CONFIG, e.to_string()))?;
            let outcome = Rotator::with_store(shared, provider, store)
                .once(force)
                .await;
            cancel.cancel();
            let _ = cluster.await;
            outcome?
        }
    };
    match outcome {
        Some(RotationOutcome::Rotated {
            token_id,
            fingerprint,
            expires_at,
        }) => {
            println!("rotated: new token {fingerprint} (id {token_id}) expires at {expires_at}");
            Ok(0)
        }
        Some(RotationOutcome::Adopted) => {
            println!("another writer changed the token meanwhile; using theirs");
            Ok(0)
        }
        None => {
            println!("not due: the token on disk is fresh");
            Ok(exit::NOT_DUE)
        }
    }
}
