//! The cluster store's wake-ups between its tasks (the mirror, the election, the rotation
//! loop): each is waited on by one task, and a raise while that task is busy is kept.

/// A wake-up for one waiting task that is kept when that task is busy: raised while the
/// rotation loop is in the middle of a turn (the mirror adopting the Secret meanwhile), it
/// ends the loop's next wait at once. A `Notify::notify_waiters` would be lost there, and
/// the loop would sleep on a decision made before the change (a new holder deciding on its
/// own file while the Secret holds a dead token).
pub(super) struct Signal(tokio::sync::Notify);

impl Signal {
    pub(super) fn new() -> Self {
        Signal(tokio::sync::Notify::new())
    }

    pub(super) fn raise(&self) {
        self.0.notify_one();
    }

    pub(super) async fn raised(&self) {
        self.0.notified().await
    }

    /// Forgets a raise not yet waited on (the work it asks for is being done anyway).
    pub(super) fn clear(&self) {
        use futures_util::FutureExt;
        let _ = self.0.notified().now_or_never();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// The rotation loop is often busy (deciding, minting, revoking) when the mirror
    /// changes the view: the change must end its next wait, once.
    #[test]
    fn a_signal_raised_while_its_waiter_is_busy_ends_the_next_wait() {
        let signal = Signal::new();
        signal.raise();
        assert!(Box::pin(signal.raised()).now_or_never().is_some());
        assert!(Box::pin(signal.raised()).now_or_never().is_none());
        signal.raise();
        signal.raise();
        signal.clear();
        assert!(Box::pin(signal.raised()).now_or_never().is_none());
    }
}
