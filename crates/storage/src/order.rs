//! The order of overlapping group transactions (`Store::finish_and_claim_in_turn`).
//!
//! A group transaction has two phases. The first only writes the completions of its own
//! items (row locks no other group asks for) and reads what its claims could take; the
//! second locks batch rows and everything after them. Groups take turns in the order the
//! writer started them: a group's second phase begins once the group before it has finished
//! its own (so batch rows are always locked in turn order, and no group waits for a lock a
//! later group holds), and its last writes, which on PostgreSQL take its `COMMIT` with them,
//! go out only after the group before it has ended. So a claim never commits before the
//! results whose slots it reuses, and on PostgreSQL the next group's completions are written
//! while the previous group locks, writes and commits.

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::StoreError;

/// How long a group waits for the one before it before giving up (and rolling back, which
/// releases whatever it holds). Only a fault makes a wait this long.
const TURN_WAIT: Duration = Duration::from_secs(30);

/// Hands out turns, each linked to the one before it.
#[derive(Debug, Default)]
pub(crate) struct CommitOrder {
    last: std::sync::Mutex<Option<Previous>>,
}

/// What a turn waits for of the turn before it: the end of its second phase, and its end.
#[derive(Debug)]
struct Previous {
    phase_done: oneshot::Receiver<()>,
    ended: oneshot::Receiver<()>,
}

impl CommitOrder {
    /// The next turn, after every turn handed out before it.
    pub(crate) fn turn(&self) -> Turn {
        let (phase_tx, phase_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        let previous = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(Previous {
                phase_done: phase_rx,
                ended: ended_rx,
            });
        Turn {
            previous,
            first_phase_done: None,
            phase_done: Some(phase_tx),
            _ended: ended_tx,
        }
    }
}

/// One group's place in the order. Dropping it (the transaction ended, committed or not)
/// lets the next group go on.
#[derive(Debug)]
pub struct Turn {
    previous: Option<Previous>,
    first_phase_done: Option<oneshot::Sender<()>>,
    phase_done: Option<oneshot::Sender<()>>,
    _ended: oneshot::Sender<()>,
}

/// Resolves once a group has finished its first phase (or ended): the moment to form the
/// next group, which then has the most to carry and overlaps the rest of this one.
#[derive(Debug)]
pub struct FirstPhaseDone(oneshot::Receiver<()>);

impl Future for FirstPhaseDone {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

impl Turn {
    /// What resolves once this group has finished its first phase.
    pub fn first_phase_done(&mut self) -> FirstPhaseDone {
        let (tx, rx) = oneshot::channel();
        self.first_phase_done = Some(tx);
        FirstPhaseDone(rx)
    }

    /// A turn that waits for no other and that no other waits for: for a transaction that
    /// keeps no order with others, or a store whose write transactions cannot overlap.
    pub fn unordered() -> Self {
        CommitOrder::default().turn()
    }

    /// Marks this group's first phase done, then waits until the group before it has
    /// finished its second phase.
    pub(crate) async fn second_phase(&mut self) -> Result<(), StoreError> {
        drop(self.first_phase_done.take());
        match self.previous.as_mut() {
            Some(previous) => wait(&mut previous.phase_done).await,
            None => Ok(()),
        }
    }

    /// Waits until the group before this one has ended: before this group's last writes
    /// (which may commit it), and for a store whose write transactions run one at a time,
    /// before this group's begins.
    pub(crate) async fn after_previous(&mut self) -> Result<(), StoreError> {
        match self.previous.as_mut() {
            Some(previous) => wait(&mut previous.ended).await,
            None => Ok(()),
        }
    }

    /// Marks this group's second phase done: the next group's may begin.
    pub(crate) fn second_phase_done(&mut self) {
        drop(self.phase_done.take());
    }
}

/// Waits for a sender to be dropped (or to send), at most `TURN_WAIT`.
async fn wait(rx: &mut oneshot::Receiver<()>) -> Result<(), StoreError> {
    if rx.is_terminated() {
        return Ok(());
    }
    match tokio::time::timeout(TURN_WAIT, rx).await {
        Ok(_) => Ok(()),
        Err(_) => Err(StoreError::Connection(format!(
            "the group transaction before this one did not move on within {} s",
            TURN_WAIT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_follow_the_order_they_were_taken_in() {
        let order = CommitOrder::default();
        let mut first = order.turn();
        let mut second = order.turn();
        first.second_phase().await.expect("the first turn waits for nothing");
        // The second waits for the first's second phase.
        let waiting = tokio::time::timeout(Duration::from_millis(20), second.second_phase()).await;
        assert!(waiting.is_err(), "the second phase waits for the first's");
        let second_task = tokio::spawn(async move {
            second.second_phase().await.expect("phase");
            second.after_previous().await.expect("commit");
            second
        });
        first.after_previous().await.expect("the first commits at once");
        first.second_phase_done();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !second_task.is_finished(),
            "the second commits only after the first has ended"
        );
        drop(first);
        let second = second_task.await.expect("the second ends");
        drop(second);
        // A turn after a dropped one goes on at once.
        let mut third = order.turn();
        third.second_phase().await.expect("phase");
        third.after_previous().await.expect("commit");
    }

    #[tokio::test]
    async fn a_turn_dropped_early_releases_the_next() {
        let order = CommitOrder::default();
        let first = order.turn();
        let mut second = order.turn();
        drop(first);
        second.second_phase().await.expect("phase");
        second.after_previous().await.expect("commit");
    }
}
