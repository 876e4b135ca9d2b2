//! What a destination daemon keeps of its sessions for their source to ask about after the
//! session itself is gone or done (a fault window's figures, a finish's answer), each
//! forgotten by itself at a deadline if the source never asks.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

/// Values by session id, each kept until its deadline.
pub struct Kept<T>(Arc<Mutex<HashMap<u64, T>>>);

impl<T> Clone for Kept<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Send + 'static> Kept<T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, T>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `value` for session `session` until `forget_at`. Call on the daemon's runtime.
    pub fn keep(&self, session: u64, value: T, forget_at: Instant) {
        self.lock().insert(session, value);
        let kept = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(forget_at.into()).await;
            kept.lock().remove(&session);
        });
    }

    /// Session `session`'s value, taken out: asked for once.
    pub fn take(&self, session: u64) -> Option<T> {
        self.lock().remove(&session)
    }
}

impl<T: Clone + Send + 'static> Kept<T> {
    /// Session `session`'s value, left in place: the same answer each time it is asked.
    pub fn get(&self, session: u64) -> Option<T> {
        self.lock().get(&session).cloned()
    }
}
