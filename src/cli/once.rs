//! `pat-rotator once`: one decision, one rotation if due.

use super::store::{with_store, StoreWork};
use super::{exit, provider_for, runtime, CliError};
use crate::config::Config;
use crate::provider::Provider;
use crate::rotator::{RotateError, RotationOutcome, Rotator};
use crate::shared::Shared;
use crate::store::CredentialStore;
use std::sync::Arc;

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
    /// One decision as a replica too: with the cluster store it rotates only if it wins
    /// the Lease, and releases the Lease when done.
    struct Once<P> {
        provider: Arc<P>,
        force: bool,
    }
    impl<P: Provider> StoreWork for Once<P> {
        type Output = Result<Option<RotationOutcome>, RotateError>;
        async fn run<S: CredentialStore>(self, shared: Shared, store: S) -> Self::Output {
            Rotator::with_store(shared, self.provider, store)
                .once(self.force)
                .await
        }
    }
    let outcome = with_store(shared, Once { provider, force }).await??;
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
