//! The batch and item state machines of DESIGN.md section 2, one named function per
//! transition. Each returns the new status, or an `InvalidTransition` that leaves the
//! state as it was; the storage layer applies the result inside one transaction.

pub mod batch {
    //! Batch transitions.
    //!
    //! `pending → running → completed | failed | cancelled`, with `paused` beside them and
    //! `cancelling` between a cancel request and the moment no item of the batch still runs.

    use crate::counts::Counts;
    use crate::error::InvalidTransition;
    use crate::status::BatchStatus::{self, *};

    fn refuse(action: &'static str, current: BatchStatus) -> InvalidTransition {
        InvalidTransition::new("batch", action, current)
    }

    /// The first item starts. Leaves `pending`, enters `running`.
    pub fn start(current: BatchStatus) -> Result<BatchStatus, InvalidTransition> {
        match current {
            Pending => Ok(Running),
            other => Err(refuse("start", other)),
        }
    }

    /// No new item starts; items already running finish. Leaves `pending` or `running`,
    /// enters `paused`.
    pub fn pause(current: BatchStatus) -> Result<BatchStatus, InvalidTransition> {
        match current {
            Pending | Running => Ok(Paused),
            other => Err(refuse("pause", other)),
        }
    }

    /// Leaves `paused`; enters `running` if an item of the batch has ever started, else
    /// `pending`.
    pub fn resume(current: BatchStatus, started: bool) -> Result<BatchStatus, InvalidTransition> {
        match current {
            Paused if started => Ok(Running),
            Paused => Ok(Pending),
            other => Err(refuse("resume", other)),
        }
    }

    /// A cancel request. Leaves `pending`, `running`, `paused` (or stays in `cancelling`);
    /// enters `cancelling` while `running_items` is above zero, else `cancelled` at once.
    pub fn cancel(current: BatchStatus, running_items: i64) -> Result<BatchStatus, InvalidTransition> {
        match current {
            Pending | Running | Paused | Cancelling if running_items > 0 => Ok(Cancelling),
            Pending | Running | Paused | Cancelling => Ok(Cancelled),
            other => Err(refuse("cancel", other)),
        }
    }

    /// Every item has ended. Leaves `pending`, `running`, `paused` or `cancelling`; enters
    /// `completed` if at least one item completed, else `failed` if one failed, else
    /// `cancelled` (a cancelling batch always ends `cancelled`).
    ///
    /// # Returns
    /// `Ok(None)` while some item has not ended: the batch stays as it is.
    pub fn settle(current: BatchStatus, counts: &Counts) -> Result<Option<BatchStatus>, InvalidTransition> {
        match current {
            Pending | Running | Paused | Cancelling if !counts.all_ended() => Ok(None),
            Cancelling => Ok(Some(Cancelled)),
            Pending | Running | Paused if counts.completed > 0 => Ok(Some(Completed)),
            Pending | Running | Paused if counts.failed > 0 => Ok(Some(Failed)),
            Pending | Running | Paused => Ok(Some(Cancelled)),
            other => Err(refuse("settle", other)),
        }
    }

    /// Under `fail_batch`, an item ended `failed`. Leaves `running` or `paused` (an item
    /// can still finish while its batch is paused); enters `failed`. The caller cancels
    /// the other items.
    pub fn fail_fast(current: BatchStatus) -> Result<BatchStatus, InvalidTransition> {
        match current {
            Running | Paused => Ok(Failed),
            other => Err(refuse("fail", other)),
        }
    }

    /// Retry: the failed items go back to pending. Leaves `completed` or `failed`, enters
    /// `running`; refused when the batch has no failed item to retry.
    pub fn retry(current: BatchStatus, retryable_items: i64) -> Result<BatchStatus, InvalidTransition> {
        match current {
            Completed | Failed if retryable_items > 0 => Ok(Running),
            other => Err(refuse("retry", other)),
        }
    }
}

pub mod item {
    //! Item transitions.
    //!
    //! `pending → running → completed | failed | cancelled`, with `pending` again for a
    //! retry after a backoff, and `needs_input` while the handler waits for an answer.

    use crate::error::InvalidTransition;
    use crate::status::CancelReason;
    use crate::status::ItemStatus::{self, *};

    fn refuse(action: &'static str, current: ItemStatus) -> InvalidTransition {
        InvalidTransition::new("item", action, current)
    }

    /// A worker claims the item. Leaves `pending`, enters `running`.
    pub fn start(current: ItemStatus) -> Result<ItemStatus, InvalidTransition> {
        match current {
            Pending => Ok(Running),
            other => Err(refuse("start", other)),
        }
    }

    /// The handler returned a result. Leaves `running`, enters `completed`.
    pub fn complete(current: ItemStatus) -> Result<ItemStatus, InvalidTransition> {
        match current {
            Running => Ok(Completed),
            other => Err(refuse("complete", other)),
        }
    }

    /// The handler failed for good (permanent, or attempts used up). Leaves `running`,
    /// enters `failed`.
    pub fn fail(current: ItemStatus) -> Result<ItemStatus, InvalidTransition> {
        match current {
            Running => Ok(Failed),
            other => Err(refuse("fail", other)),
        }
    }

    /// The handler failed and may try again after a backoff, or its lease expired, or it
    /// was handed back at shutdown. Leaves `running`, enters `pending`.
    pub fn requeue(current: ItemStatus) -> Result<ItemStatus, InvalidTransition> {
        match current {
            Running => Ok(Pending),
            other => Err(refuse("requeue", other)),
        }
    }

    /// The handler asked a question. Leaves `running`, enters `needs_input`.
    pub fn ask_input(current: ItemStatus) -> Result<ItemStatus, InvalidTransition> {
        match current {
            Running => Ok(NeedsInput),
            other => Err(refuse("ask for input on", other)),
        }
    }

    /// An answer arrived. Leaves `needs_input`, enters `pending`.
    pub fn answer(current: ItemStatus) -> Result<ItemStatus, InvalidTransition> {
        match current {
            NeedsInput => Ok(Pending),
            other => Err(refuse("answer", other)),
        }
    }

    /// Cancels the item. On its own (`CancelReason::Item`) only a pending item may be
    /// cancelled; through its batch, a pending or waiting item is cancelled at once and a
    /// running one when its worker stops. Leaves `pending`, `needs_input` or `running`,
    /// enters `cancelled`.
    pub fn cancel(current: ItemStatus, reason: CancelReason) -> Result<ItemStatus, InvalidTransition> {
        match (current, reason) {
            (Pending, _) => Ok(Cancelled),
            (NeedsInput | Running, CancelReason::Batch | CancelReason::FailBatch) => Ok(Cancelled),
            (other, _) => Err(refuse("cancel", other)),
        }
    }

    /// A batch retry. Leaves `failed`, or `cancelled` when `fail_batch` cancelled it;
    /// enters `pending` with its attempts reset.
    pub fn retry(current: ItemStatus, cancel_reason: Option<CancelReason>) -> Result<ItemStatus, InvalidTransition> {
        match (current, cancel_reason) {
            (Failed, _) | (Cancelled, Some(CancelReason::FailBatch)) => Ok(Pending),
            (other, _) => Err(refuse("retry", other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counts::Counts;
    use crate::status::BatchStatus::{self, *};
    use crate::status::CancelReason;
    use crate::status::ItemStatus;

    fn allowed_from(f: impl Fn(BatchStatus) -> Result<BatchStatus, crate::InvalidTransition>) -> Vec<BatchStatus> {
        BatchStatus::ALL.iter().copied().filter(|s| f(*s).is_ok()).collect()
    }

    #[test]
    fn batch_start_pause_resume() {
        assert_eq!(allowed_from(batch::start), vec![Pending]);
        assert_eq!(batch::start(Pending), Ok(Running));
        assert_eq!(allowed_from(batch::pause), vec![Pending, Running]);
        assert_eq!(batch::pause(Running), Ok(Paused));
        assert_eq!(allowed_from(|s| batch::resume(s, true)), vec![Paused]);
        assert_eq!(batch::resume(Paused, true), Ok(Running));
        assert_eq!(batch::resume(Paused, false), Ok(Pending));
        let err = batch::pause(Completed).expect_err("completed cannot pause");
        assert_eq!(err.current, "completed");
        assert_eq!(err.to_string(), "cannot pause a batch that is completed");
    }

    #[test]
    fn batch_cancel_goes_through_cancelling_while_items_run() {
        assert_eq!(
            allowed_from(|s| batch::cancel(s, 0)),
            vec![Pending, Running, Paused, Cancelling]
        );
        for s in [Pending, Running, Paused, Cancelling] {
            assert_eq!(batch::cancel(s, 2), Ok(Cancelling));
            assert_eq!(batch::cancel(s, 0), Ok(Cancelled));
        }
        for s in [Completed, Failed, Cancelled] {
            assert!(batch::cancel(s, 0).is_err());
        }
    }

    #[test]
    fn batch_settles_by_the_counts() {
        let mut c = Counts::new(3);
        assert_eq!(batch::settle(Running, &c), Ok(None));
        c.shift(ItemStatus::Pending, ItemStatus::Cancelled, 3);
        assert_eq!(batch::settle(Running, &c), Ok(Some(Cancelled)));
        c.shift(ItemStatus::Cancelled, ItemStatus::Failed, 1);
        assert_eq!(batch::settle(Running, &c), Ok(Some(Failed)));
        c.shift(ItemStatus::Cancelled, ItemStatus::Completed, 1);
        assert_eq!(batch::settle(Paused, &c), Ok(Some(Completed)));
        assert_eq!(batch::settle(Cancelling, &c), Ok(Some(Cancelled)));
        assert!(batch::settle(Completed, &c).is_err());
        assert_eq!(batch::settle(Pending, &Counts::new(0)), Ok(Some(Cancelled)));
    }

    #[test]
    fn batch_fail_fast_and_retry() {
        assert_eq!(allowed_from(batch::fail_fast), vec![Running, Paused]);
        assert_eq!(allowed_from(|s| batch::retry(s, 1)), vec![Completed, Failed]);
        assert!(batch::retry(Completed, 0).is_err(), "nothing to retry");
        assert!(
            batch::retry(Cancelled, 3).is_err(),
            "a cancelled batch cannot be retried"
        );
        assert_eq!(batch::retry(Failed, 1), Ok(Running));
    }

    fn item_allowed(f: impl Fn(ItemStatus) -> Result<ItemStatus, crate::InvalidTransition>) -> Vec<ItemStatus> {
        ItemStatus::ALL.iter().copied().filter(|s| f(*s).is_ok()).collect()
    }

    #[test]
    fn item_transitions_leave_only_the_documented_states() {
        use ItemStatus as I;
        assert_eq!(item_allowed(item::start), vec![I::Pending]);
        assert_eq!(item_allowed(item::complete), vec![I::Running]);
        assert_eq!(item_allowed(item::fail), vec![I::Running]);
        assert_eq!(item_allowed(item::requeue), vec![I::Running]);
        assert_eq!(item_allowed(item::ask_input), vec![I::Running]);
        assert_eq!(item_allowed(item::answer), vec![I::NeedsInput]);
        assert_eq!(item::answer(I::NeedsInput), Ok(I::Pending));
        assert_eq!(item::ask_input(I::Running), Ok(I::NeedsInput));
        assert_eq!(item::requeue(I::Running), Ok(I::Pending));
    }

    #[test]
    fn item_cancel_on_its_own_only_while_pending() {
        use ItemStatus as I;
        assert_eq!(item_allowed(|s| item::cancel(s, CancelReason::Item)), vec![I::Pending]);
        assert_eq!(
            item_allowed(|s| item::cancel(s, CancelReason::Batch)),
            vec![I::Pending, I::Running, I::NeedsInput]
        );
        assert!(item::cancel(I::Completed, CancelReason::Item).is_err());
    }

    #[test]
    fn item_retry_brings_back_failed_and_fail_batch_cancelled_only() {
        use ItemStatus as I;
        assert_eq!(item::retry(I::Failed, None), Ok(I::Pending));
        assert_eq!(item::retry(I::Cancelled, Some(CancelReason::FailBatch)), Ok(I::Pending));
        assert!(item::retry(I::Cancelled, Some(CancelReason::Item)).is_err());
        assert!(item::retry(I::Cancelled, Some(CancelReason::Batch)).is_err());
        assert!(item::retry(I::Completed, None).is_err());
    }
}
