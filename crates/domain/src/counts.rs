//! Per-status item counters of a batch.

use serde::{Deserialize, Serialize};

use crate::status::ItemStatus;

/// How many items of a batch are in each status. `pending + running + completed + failed +
/// cancelled + needs_input == total` holds after every operation: items only move between
/// statuses, they never appear or vanish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Counts {
    pub total: i64,
    pub pending: i64,
    pub running: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub needs_input: i64,
}

impl Counts {
    /// A new batch: every item pending.
    pub fn new(total: i64) -> Self {
        Self {
            total,
            pending: total,
            ..Self::default()
        }
    }

    /// The counter of one status.
    pub fn get(&self, status: ItemStatus) -> i64 {
        match status {
            ItemStatus::Pending => self.pending,
            ItemStatus::Running => self.running,
            ItemStatus::NeedsInput => self.needs_input,
            ItemStatus::Completed => self.completed,
            ItemStatus::Failed => self.failed,
            ItemStatus::Cancelled => self.cancelled,
        }
    }

    fn slot(&mut self, status: ItemStatus) -> &mut i64 {
        match status {
            ItemStatus::Pending => &mut self.pending,
            ItemStatus::Running => &mut self.running,
            ItemStatus::NeedsInput => &mut self.needs_input,
            ItemStatus::Completed => &mut self.completed,
            ItemStatus::Failed => &mut self.failed,
            ItemStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// Moves `n` items from one status to another. The sum is unchanged by construction.
    pub fn shift(&mut self, from: ItemStatus, to: ItemStatus, n: i64) {
        *self.slot(from) -= n;
        *self.slot(to) += n;
    }

    /// The sum of the per-status counters; equals `total` while the counters are consistent.
    pub fn sum(&self) -> i64 {
        self.pending + self.running + self.completed + self.failed + self.cancelled + self.needs_input
    }

    /// Items that have ended (completed, failed or cancelled).
    pub fn ended(&self) -> i64 {
        self.completed + self.failed + self.cancelled
    }

    /// Whether every item has ended.
    pub fn all_ended(&self) -> bool {
        self.ended() == self.total
    }

    /// `ended / total`, from 0.0 to 1.0; an empty batch is complete.
    pub fn progress(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.ended() as f64 / self.total as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifting_keeps_the_sum_and_progress_follows_ended_items() {
        let mut c = Counts::new(4);
        c.shift(ItemStatus::Pending, ItemStatus::Running, 2);
        c.shift(ItemStatus::Running, ItemStatus::Completed, 1);
        c.shift(ItemStatus::Running, ItemStatus::Failed, 1);
        assert_eq!(c.sum(), 4);
        assert_eq!(c.ended(), 2);
        assert!((c.progress() - 0.5).abs() < f64::EPSILON);
        assert!(!c.all_ended());
        c.shift(ItemStatus::Pending, ItemStatus::Cancelled, 2);
        assert!(c.all_ended());
        assert_eq!(c.get(ItemStatus::Cancelled), 2);
    }
}
