//! Property tests of the batch and item state machines, the counters and the retry policy
//! (DESIGN.md section 2).
//!
//! What this file checks:
//! 1. Counters always sum to the total. A small test-only model of a store (one batch, its
//!    items, their cancel reasons and a `Counts`) runs random sequences of operations, each
//!    applied only through `batchd_domain::transition`; after every step the counters sum to
//!    `total` and equal a recount of the items.
//! 2. Terminal states stay terminal: every batch transition but `retry` refuses a terminal
//!    batch, and every item transition but `retry` refuses an ended item.
//! 3. A refused transition changes nothing: the model's state is the same before and after
//!    it, and the error names the current status by its spelling.
//! 4. Retry delays: jitter keeps a delay within `[nominal / 2, nominal]`, the nominal delay
//!    never exceeds `max` and never shrinks as attempts grow, and a permanent error is never
//!    retried.

use std::time::Duration;

use batchd_domain::transition::{batch, item};
use batchd_domain::{
    BatchStatus, CancelReason, Counts, FailureDecision, InvalidTransition, ItemStatus, OnItemFailure, RetryPolicy,
    decide_failure,
};
use proptest::prelude::*;

/// The most items a model batch holds; small, so random operations hit the same items often.
const MAX_ITEMS: usize = 6;

/// One thing a store may do to a batch or one of its items. `usize` fields pick an item
/// (taken modulo the batch's size).
#[derive(Debug, Clone, Copy)]
enum Op {
    /// A worker claims the item (`item::start`, and `batch::start` for the first one).
    Claim(usize),
    /// The handler returned a result.
    Complete(usize),
    /// The handler failed for good; under `fail_batch` the batch fails with it.
    Fail(usize),
    /// The handler failed and will try again, or its lease expired.
    Requeue(usize),
    /// The handler asked a question.
    AskInput(usize),
    /// An answer arrived through the API.
    Answer(usize),
    /// `POST /v1/items/{id}/cancel`.
    CancelItem(usize),
    /// `POST /v1/batches/{id}/cancel`.
    CancelBatch,
    /// `POST /v1/batches/{id}/pause`.
    Pause,
    /// `POST /v1/batches/{id}/resume`.
    Resume,
    /// `POST /v1/batches/{id}/retry`.
    RetryBatch,
}

impl Op {
    fn is_batch_retry(self) -> bool {
        matches!(self, Op::RetryBatch)
    }
}

/// What became of one operation.
#[derive(Debug)]
enum Outcome {
    /// The domain allowed it and the model changed accordingly.
    Applied,
    /// A domain transition refused it; `expected_current` is the spelling of the status the
    /// refused transition was given.
    Refused {
        error: InvalidTransition,
        expected_current: &'static str,
    },
    /// The store would not attempt it (e.g. no claim from a paused batch); not a domain call.
    NotAttempted,
}

/// One item of the model: its status and, once cancelled, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelItem {
    status: ItemStatus,
    cancel_reason: Option<CancelReason>,
}

/// A test-only stand-in for the store: one batch, its items and its counters, changed only
/// through the domain transition functions.
#[derive(Debug, Clone, PartialEq)]
struct ModelBatch {
    status: BatchStatus,
    on_item_failure: OnItemFailure,
    /// Whether an item of the batch has ever started (what `batch::resume` needs).
    started: bool,
    items: Vec<ModelItem>,
    counts: Counts,
}

impl ModelBatch {
    fn new(size: usize, on_item_failure: OnItemFailure) -> Self {
        let total = i64::try_from(size).expect("a model batch is small");
        Self {
            status: BatchStatus::Pending,
            on_item_failure,
            started: false,
            items: vec![
                ModelItem {
                    status: ItemStatus::Pending,
                    cancel_reason: None
                };
                size
            ],
            counts: Counts::new(total),
        }
    }

    fn pick(&self, index: usize) -> usize {
        index % self.items.len()
    }

    /// Counts the items by status, from scratch.
    fn recount(&self) -> Counts {
        let mut counts = Counts {
            total: self.counts.total,
            ..Counts::default()
        };
        for model_item in &self.items {
            match model_item.status {
                ItemStatus::Pending => counts.pending += 1,
                ItemStatus::Running => counts.running += 1,
                ItemStatus::NeedsInput => counts.needs_input += 1,
                ItemStatus::Completed => counts.completed += 1,
                ItemStatus::Failed => counts.failed += 1,
                ItemStatus::Cancelled => counts.cancelled += 1,
            }
        }
        counts
    }

    /// Moves item `index` to `to`, keeping the counters in step, as the store does in one
    /// transaction.
    fn move_item(&mut self, index: usize, to: ItemStatus, cancel_reason: Option<CancelReason>) {
        let from = self.items[index].status;
        self.items[index] = ModelItem {
            status: to,
            cancel_reason,
        };
        self.counts.shift(from, to, 1);
    }

    /// Applies one item transition to item `index`: on `Ok` the item moves, on `Err`
    /// nothing changes and the refusal is returned.
    fn apply_item(
        &mut self,
        index: usize,
        transition: impl FnOnce(ItemStatus) -> Result<ItemStatus, InvalidTransition>,
        cancel_reason: Option<CancelReason>,
    ) -> Outcome {
        let from = self.items[index].status;
        match transition(from) {
            Ok(to) => {
                self.move_item(index, to, cancel_reason);
                Outcome::Applied
            }
            Err(error) => Outcome::Refused {
                error,
                expected_current: from.as_str(),
            },
        }
    }

    /// Applies one batch transition: on `Ok` the batch takes the new status, on `Err`
    /// nothing changes and the refusal is returned.
    fn apply_batch(
        &mut self,
        transition: impl FnOnce(BatchStatus) -> Result<BatchStatus, InvalidTransition>,
    ) -> Outcome {
        let from = self.status;
        match transition(from) {
            Ok(to) => {
                self.status = to;
                Outcome::Applied
            }
            Err(error) => Outcome::Refused {
                error,
                expected_current: from.as_str(),
            },
        }
    }

    /// Cancels, with `reason`, every item that `item::cancel` accepts and that `select`
    /// picks; the others stay as they are.
    fn cancel_items_where(&mut self, reason: CancelReason, select: impl Fn(ItemStatus) -> bool) {
        for index in 0..self.items.len() {
            let status = self.items[index].status;
            if select(status) {
                if let Ok(to) = item::cancel(status, reason) {
                    self.move_item(index, to, Some(reason));
                }
            }
        }
    }

    /// What the store does after an item changed: a cancelling batch cancels an item that
    /// stopped running without ending, then the batch settles once every item has ended.
    fn after_item_change(&mut self, index: usize) {
        if self.status == BatchStatus::Cancelling {
            let status = self.items[index].status;
            if matches!(status, ItemStatus::Pending | ItemStatus::NeedsInput) {
                if let Ok(to) = item::cancel(status, CancelReason::Batch) {
                    self.move_item(index, to, Some(CancelReason::Batch));
                }
            }
        }
        self.settle();
    }

    /// `batch::settle` as the store applies it: a new status when it gives one; a refusal
    /// (the batch is already terminal) leaves the batch alone.
    fn settle(&mut self) {
        if let Ok(Some(to)) = batch::settle(self.status, &self.counts) {
            self.status = to;
        }
    }

    /// Applies `op` the way a store would, through the domain transitions only.
    fn apply(&mut self, op: Op) -> Outcome {
        match op {
            Op::Claim(index) => self.claim(self.pick(index)),
            Op::Complete(index) => self.item_op(self.pick(index), item::complete),
            Op::Fail(index) => self.fail(self.pick(index)),
            Op::Requeue(index) => self.item_op(self.pick(index), item::requeue),
            Op::AskInput(index) => self.item_op(self.pick(index), item::ask_input),
            Op::Answer(index) => self.item_op(self.pick(index), item::answer),
            Op::CancelItem(index) => self.cancel_item(self.pick(index)),
            Op::CancelBatch => self.cancel_batch(),
            Op::Pause => self.apply_batch(batch::pause),
            Op::Resume => {
                let started = self.started;
                self.apply_batch(|status| batch::resume(status, started))
            }
            Op::RetryBatch => self.retry_batch(),
        }
    }

    /// A plain item transition followed by what the store does after any item change.
    fn item_op(
        &mut self,
        index: usize,
        transition: impl FnOnce(ItemStatus) -> Result<ItemStatus, InvalidTransition>,
    ) -> Outcome {
        let outcome = self.apply_item(index, transition, None);
        if matches!(outcome, Outcome::Applied) {
            self.after_item_change(index);
        }
        outcome
    }

    /// A worker claims item `index`. Workers claim only from a pending or running batch;
    /// the first claim starts the batch.
    fn claim(&mut self, index: usize) -> Outcome {
        if !matches!(self.status, BatchStatus::Pending | BatchStatus::Running) {
            return Outcome::NotAttempted;
        }
        let outcome = self.apply_item(index, item::start, None);
        if matches!(outcome, Outcome::Applied) {
            self.started = true;
            if self.status == BatchStatus::Pending {
                self.status = batch::start(self.status).expect("a pending batch starts");
            }
        }
        outcome
    }

    /// Item `index` fails for good; under `fail_batch` the batch fails (when it still can)
    /// and its other items are cancelled.
    fn fail(&mut self, index: usize) -> Outcome {
        let outcome = self.apply_item(index, item::fail, None);
        if !matches!(outcome, Outcome::Applied) {
            return outcome;
        }
        if self.on_item_failure == OnItemFailure::FailBatch {
            if let Ok(to) = batch::fail_fast(self.status) {
                self.status = to;
                self.cancel_items_where(CancelReason::FailBatch, |status| !status.is_ended());
            }
        }
        self.after_item_change(index);
        outcome
    }

    /// `POST /v1/items/{id}/cancel`: the item alone.
    fn cancel_item(&mut self, index: usize) -> Outcome {
        let outcome = self.apply_item(
            index,
            |status| item::cancel(status, CancelReason::Item),
            Some(CancelReason::Item),
        );
        if matches!(outcome, Outcome::Applied) {
            self.after_item_change(index);
        }
        outcome
    }

    /// `POST /v1/batches/{id}/cancel`: pending and waiting items are cancelled at once;
    /// running ones keep the batch `cancelling` until they stop.
    fn cancel_batch(&mut self) -> Outcome {
        let running = self.counts.running;
        let from = self.status;
        match batch::cancel(from, running) {
            Ok(to) => {
                self.cancel_items_where(CancelReason::Batch, |status| {
                    matches!(status, ItemStatus::Pending | ItemStatus::NeedsInput)
                });
                self.status = to;
                self.settle();
                Outcome::Applied
            }
            Err(error) => Outcome::Refused {
                error,
                expected_current: from.as_str(),
            },
        }
    }

    /// `POST /v1/batches/{id}/retry`: the items `item::retry` accepts go back to pending.
    fn retry_batch(&mut self) -> Outcome {
        let retryable = self
            .items
            .iter()
            .filter(|model_item| item::retry(model_item.status, model_item.cancel_reason).is_ok())
            .count();
        let retryable = i64::try_from(retryable).expect("a model batch is small");
        let outcome = self.apply_batch(|status| batch::retry(status, retryable));
        if matches!(outcome, Outcome::Applied) {
            for index in 0..self.items.len() {
                let ModelItem { status, cancel_reason } = self.items[index];
                if let Ok(to) = item::retry(status, cancel_reason) {
                    self.move_item(index, to, None);
                }
            }
        }
        outcome
    }
}

/// Random operations, weighted so that items mostly move forward and batch-wide requests
/// (which often end the batch) come less often.
fn op_strategy() -> impl Strategy<Value = Op> {
    let index = 0..MAX_ITEMS;
    prop_oneof![
        12 => index.clone().prop_map(Op::Claim),
        10 => index.clone().prop_map(Op::Complete),
        5 => index.clone().prop_map(Op::Fail),
        5 => index.clone().prop_map(Op::Requeue),
        3 => index.clone().prop_map(Op::AskInput),
        4 => index.clone().prop_map(Op::Answer),
        2 => index.prop_map(Op::CancelItem),
        1 => Just(Op::CancelBatch),
        2 => Just(Op::Pause),
        3 => Just(Op::Resume),
        3 => Just(Op::RetryBatch),
    ]
}

fn on_item_failure_strategy() -> impl Strategy<Value = OnItemFailure> {
    prop_oneof![Just(OnItemFailure::Continue), Just(OnItemFailure::FailBatch)]
}

/// A terminal batch status (completed, failed or cancelled).
fn terminal_batch_status_strategy() -> impl Strategy<Value = BatchStatus> {
    let terminal: Vec<BatchStatus> = BatchStatus::ALL
        .iter()
        .copied()
        .filter(|status| status.is_terminal())
        .collect();
    prop::sample::select(terminal)
}

/// An ended item status (completed, failed or cancelled).
fn ended_item_status_strategy() -> impl Strategy<Value = ItemStatus> {
    let ended: Vec<ItemStatus> = ItemStatus::ALL
        .iter()
        .copied()
        .filter(|status| status.is_ended())
        .collect();
    prop::sample::select(ended)
}

fn cancel_reason_strategy() -> impl Strategy<Value = CancelReason> {
    prop::sample::select(CancelReason::ALL)
}

/// Any counters, consistent or not: terminal refusals must not depend on them.
fn counts_strategy() -> impl Strategy<Value = Counts> {
    prop::array::uniform6(0..20_i64).prop_map(|[pending, running, completed, failed, cancelled, needs_input]| Counts {
        total: pending + running + completed + failed + cancelled + needs_input,
        pending,
        running,
        completed,
        failed,
        cancelled,
        needs_input,
    })
}

/// Asserts that `result` is a refusal of `entity` that names `current` by its spelling.
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, InvalidTransition>,
    entity: &str,
    current: &str,
) -> Result<(), TestCaseError> {
    match result {
        Ok(value) => Err(TestCaseError::fail(format!(
            "a {entity} that is {current} was allowed to become {value:?}"
        ))),
        Err(error) => {
            prop_assert_eq!(error.entity, entity);
            prop_assert_eq!(error.current.as_str(), current);
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Properties 1 and 3, and terminal batches in the model: after every operation the
    /// counters sum to the total and match a recount; a refused operation changes nothing
    /// and names the current status; a terminal batch changes only by a retry.
    #[test]
    fn counters_stay_consistent_and_refusals_change_nothing(
        size in 1..=MAX_ITEMS,
        on_item_failure in on_item_failure_strategy(),
        ops in prop::collection::vec(op_strategy(), 0..80),
    ) {
        let mut model = ModelBatch::new(size, on_item_failure);
        for (step, op) in ops.into_iter().enumerate() {
            let before = model.clone();
            match model.apply(op) {
                Outcome::Applied => {}
                Outcome::Refused { error, expected_current } => {
                    prop_assert_eq!(&model, &before, "step {}: refused {:?} changed the model", step, op);
                    prop_assert_eq!(error.current.as_str(), expected_current, "step {}: {:?}", step, op);
                }
                Outcome::NotAttempted => {
                    prop_assert_eq!(&model, &before, "step {}: {:?} was not attempted yet changed the model", step, op);
                }
            }
            prop_assert_eq!(model.counts.sum(), model.counts.total, "step {}: {:?} -> {:?}", step, op, model.counts);
            prop_assert_eq!(model.counts, model.recount(), "step {}: {:?}", step, op);
            prop_assert!(
                ItemStatus::ALL.iter().all(|status| model.counts.get(*status) >= 0),
                "step {}: a negative counter {:?}", step, model.counts
            );
            if before.status.is_terminal() && !op.is_batch_retry() {
                prop_assert_eq!(model.status, before.status, "step {}: {:?} left a terminal batch", step, op);
            }
            if model.status.is_terminal() {
                prop_assert!(model.counts.all_ended(), "step {}: {:?} is terminal with {:?}", step, model.status, model.counts);
            }
        }
    }

    /// Property 2 for batches: a terminal batch refuses every transition but `retry`, and
    /// `retry` takes it back only from completed or failed, with something to retry.
    #[test]
    fn terminal_batches_refuse_everything_but_retry(
        status in terminal_batch_status_strategy(),
        started in any::<bool>(),
        running_items in 0..10_i64,
        retryable_items in 0..10_i64,
        counts in counts_strategy(),
    ) {
        let spelling = status.as_str();
        assert_refused(batch::start(status), "batch", spelling)?;
        assert_refused(batch::pause(status), "batch", spelling)?;
        assert_refused(batch::resume(status, started), "batch", spelling)?;
        assert_refused(batch::cancel(status, running_items), "batch", spelling)?;
        assert_refused(batch::settle(status, &counts), "batch", spelling)?;
        assert_refused(batch::fail_fast(status), "batch", spelling)?;
        let retry = batch::retry(status, retryable_items);
        if matches!(status, BatchStatus::Completed | BatchStatus::Failed) && retryable_items > 0 {
            prop_assert_eq!(retry, Ok(BatchStatus::Running));
        } else {
            assert_refused(retry, "batch", spelling)?;
        }
    }

    /// Property 2 for items: an ended item refuses every transition but `retry`, including
    /// a cancel for any reason; `retry` brings back only a failed item or one `fail_batch`
    /// cancelled.
    #[test]
    fn ended_items_refuse_everything_but_retry(
        status in ended_item_status_strategy(),
        reason in cancel_reason_strategy(),
        cancel_reason in prop::option::of(cancel_reason_strategy()),
    ) {
        let spelling = status.as_str();
        assert_refused(item::start(status), "item", spelling)?;
        assert_refused(item::complete(status), "item", spelling)?;
        assert_refused(item::fail(status), "item", spelling)?;
        assert_refused(item::requeue(status), "item", spelling)?;
        assert_refused(item::ask_input(status), "item", spelling)?;
        assert_refused(item::answer(status), "item", spelling)?;
        assert_refused(item::cancel(status, reason), "item", spelling)?;
        let retry = item::retry(status, cancel_reason);
        let retryable = status == ItemStatus::Failed
            || (status == ItemStatus::Cancelled && cancel_reason == Some(CancelReason::FailBatch));
        if retryable {
            prop_assert_eq!(retry, Ok(ItemStatus::Pending));
        } else {
            assert_refused(retry, "item", spelling)?;
        }
    }

    /// Property 4: the default policy's delay lies in `[nominal / 2, nominal]`, and the
    /// nominal delay stays within `max` and never shrinks as attempts grow.
    #[test]
    fn default_retry_delays_stay_in_bounds(attempt in 1..=100_i32, unit in 0.0..1.0_f64) {
        let policy = RetryPolicy::default();
        let nominal = policy.nominal_delay(attempt);
        let delay = policy.delay(attempt, unit);
        prop_assert!(nominal <= policy.max, "attempt {}: nominal {:?} > max {:?}", attempt, nominal, policy.max);
        prop_assert!(delay <= nominal, "attempt {}, unit {}: {:?} > {:?}", attempt, unit, delay, nominal);
        prop_assert!(delay >= nominal / 2, "attempt {}, unit {}: {:?} < half of {:?}", attempt, unit, delay, nominal);
        let next = policy.nominal_delay(attempt + 1);
        prop_assert!(nominal <= next, "attempt {}: {:?} then {:?}", attempt, nominal, next);
    }

    /// Property 4 beyond the defaults: the same bounds and monotony for any policy whose
    /// factor is at least 1.
    #[test]
    fn any_growing_policy_keeps_its_delays_in_bounds(
        base_ms in 0..10_000_u64,
        factor in 1.0..10.0_f64,
        max_ms in 0..3_600_000_u64,
        attempt in 1..=100_i32,
        unit in 0.0..1.0_f64,
    ) {
        let policy = RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(base_ms),
            factor,
            max: Duration::from_millis(max_ms),
        };
        let nominal = policy.nominal_delay(attempt);
        let delay = policy.delay(attempt, unit);
        prop_assert!(nominal <= policy.max, "{:?} attempt {}: {:?}", policy, attempt, nominal);
        prop_assert!(delay <= nominal && delay >= nominal / 2, "{:?} attempt {}, unit {}: {:?} vs {:?}", policy, attempt, unit, delay, nominal);
        prop_assert!(nominal <= policy.nominal_delay(attempt + 1), "{:?} attempt {}", policy, attempt);
    }

    /// Property 4: a permanent error is never retried, whatever the attempt, the limit or
    /// a handler's own delay; a transient one is retried exactly while attempts remain.
    #[test]
    fn permanent_failures_give_up_and_transient_ones_retry_while_attempts_remain(
        attempt in 1..=100_i32,
        max_attempts in 1..=100_i32,
        retry_after_ms in prop::option::of(0..600_000_u64),
        unit in 0.0..1.0_f64,
    ) {
        let policy = RetryPolicy::default();
        let retry_after = retry_after_ms.map(Duration::from_millis);
        prop_assert_eq!(
            decide_failure(&policy, attempt, max_attempts, true, retry_after, unit),
            FailureDecision::GiveUp
        );
        let transient = decide_failure(&policy, attempt, max_attempts, false, retry_after, unit);
        if attempt >= max_attempts {
            prop_assert_eq!(transient, FailureDecision::GiveUp);
        } else {
            let expected = retry_after.unwrap_or_else(|| policy.delay(attempt, unit));
            prop_assert_eq!(transient, FailureDecision::RetryAfter(expected));
        }
    }
}
