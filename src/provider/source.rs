//! [`Source`]: the provider the configuration picks (`PAT_CREDENTIAL`), one type for the
//! loop, which is generic over its provider and never asks which kind it has.

use super::{
    Capabilities, Databricks, Granted, Held, Identified, MintedToken, OAuth, Owner, Provider,
    ProviderError,
};
use crate::secret::Token;
use std::time::Duration;

/// A personal access token's provider, or an OAuth one.
#[derive(Debug)]
pub enum Source {
    Pat(Databricks),
    OAuth(Box<OAuth>),
}

impl Provider for Source {
    fn capabilities(&self) -> Capabilities {
        match self {
            Source::Pat(p) => p.capabilities(),
            Source::OAuth(p) => p.capabilities(),
        }
    }

    async fn mint_granted(&self, refresh: Option<&Token>) -> Result<Granted, ProviderError> {
        match self {
            Source::Pat(p) => p.mint_granted(refresh).await,
            Source::OAuth(p) => p.mint_granted(refresh).await,
        }
    }

    async fn mint(
        &self,
        auth: &Token,
        lifetime: Duration,
        owner: &Owner,
    ) -> Result<MintedToken, ProviderError> {
        match self {
            Source::Pat(p) => p.mint(auth, lifetime, owner).await,
            Source::OAuth(p) => p.mint(auth, lifetime, owner).await,
        }
    }

    async fn retire(&self, auth: &Token, token_id: &str) -> Result<(), ProviderError> {
        match self {
            Source::Pat(p) => p.retire(auth, token_id).await,
            Source::OAuth(p) => p.retire(auth, token_id).await,
        }
    }

    async fn held(&self, auth: &Token, owner: &Owner) -> Result<Vec<Held>, ProviderError> {
        match self {
            Source::Pat(p) => p.held(auth, owner).await,
            Source::OAuth(p) => p.held(auth, owner).await,
        }
    }

    async fn identify(
        &self,
        seed: &Token,
        minted: &MintedToken,
        owner: &Owner,
    ) -> Result<Identified, ProviderError> {
        match self {
            Source::Pat(p) => p.identify(seed, minted, owner).await,
            Source::OAuth(p) => p.identify(seed, minted, owner).await,
        }
    }

    async fn time_left(
        &self,
        token: &Token,
        token_id: &str,
    ) -> Result<Option<Duration>, ProviderError> {
        match self {
            Source::Pat(p) => p.time_left(token, token_id).await,
            Source::OAuth(p) => p.time_left(token, token_id).await,
        }
    }

    async fn verify(&self, token: &Token) -> Result<String, ProviderError> {
        match self {
            Source::Pat(p) => p.verify(token).await,
            Source::OAuth(p) => p.verify(token).await,
        }
    }
}
