//! Graceful shutdown: a signal every long-lived task watches, and a count of
//! the work still in flight so the trigger can wait for it, up to a deadline.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Held by every connection and task that must finish before exit.
#[derive(Debug, Clone)]
pub struct Watch {
    signal: watch::Receiver<bool>,
    // Never sent on: dropping the last clone tells the trigger all work is done.
    _alive: mpsc::Sender<()>,
}

/// Starts the drain and waits for the watchers.
#[derive(Debug)]
pub struct Trigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

/// A new drain pair.
pub fn channel() -> (Trigger, Watch) {
    let (signal, rx) = watch::channel(false);
    let (alive, done) = mpsc::channel(1);
    (
        Trigger { signal, done },
        Watch {
            signal: rx,
            _alive: alive,
        },
    )
}

impl Watch {
    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An error means the trigger is gone: treat as drained.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

impl Trigger {
    /// Signals every watcher, then waits until all of them are dropped or the
    /// deadline passes. Returns whether everything finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        let _ = self.signal.send(true);
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }

    /// A watcher that does not hold up [`Trigger::drain`] (for tasks such as
    /// the admin server, which should stop but need not be waited for).
    pub fn watch(&self) -> Watch {
        let (alive, _) = mpsc::channel(1);
        Watch {
            signal: self.signal.subscribe(),
            _alive: alive,
        }
    }

    /// Signals without waiting.
    pub fn signal(&self) {
        let _ = self.signal.send(true);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_watchers_until_deadline() {
        let (trigger, watch) = channel();
        let worker = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            worker.signaled().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(worker);
        });
        assert!(trigger.drain(Duration::from_secs(5)).await);
        task.await.unwrap();

        let (trigger, watch) = channel();
        let _stuck = watch;
        assert!(!trigger.drain(Duration::from_secs(1)).await);
    }
}
