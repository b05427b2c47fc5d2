//! Statuses and modes. Each enum has one lowercase spelling, shared by `Display`, `FromStr`
//! and serde, and stored as-is in the database.

string_enum!(
    /// Where a batch is in its life; see `transition::batch`.
    BatchStatus, "batch status" {
        Pending => "pending",
        Running => "running",
        Paused => "paused",
        Cancelling => "cancelling",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

string_enum!(
    /// Where an item is in its life; see `transition::item`.
    ItemStatus, "item status" {
        Pending => "pending",
        Running => "running",
        NeedsInput => "needs_input",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

string_enum!(
    /// How a batch runs its items.
    #[derive(Default)]
    Mode, "mode" {
        /// Items run concurrently within the queue's limits.
        #[default]
        Parallel => "parallel",
        /// Items run one at a time, strictly in index order, sharing one batch context.
        Sequential => "sequential",
    }
);

string_enum!(
    /// What an item that ends `failed` does to its batch.
    #[derive(Default)]
    OnItemFailure, "on_item_failure" {
        /// The other items go on.
        #[default]
        Continue => "continue",
        /// The batch fails at once and its other items are cancelled.
        FailBatch => "fail_batch",
    }
);

string_enum!(
    /// Why an item was cancelled; a retry brings back only the ones `fail_batch` cancelled.
    CancelReason, "cancel reason" {
        /// `POST /v1/items/{id}/cancel`.
        Item => "item",
        /// The whole batch was cancelled.
        Batch => "batch",
        /// Another item failed under `on_item_failure = "fail_batch"`.
        FailBatch => "fail_batch",
    }
);

string_enum!(
    /// Where a webhook delivery is: waiting for its next attempt, acknowledged with a 2xx,
    /// or given up (attempts used up, `410 Gone`, or a refused destination).
    DeliveryStatus, "delivery status" {
        Pending => "pending",
        Delivered => "delivered",
        Failed => "failed",
    }
);

impl BatchStatus {
    /// `completed`, `failed` and `cancelled`: nothing changes them but a retry.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The statuses `?status=active` stands for.
    pub const ACTIVE: &'static [BatchStatus] = &[Self::Pending, Self::Running, Self::Paused, Self::Cancelling];
}

impl ItemStatus {
    /// `completed`, `failed` and `cancelled`: the item will not run again unless its batch is retried.
    pub const fn is_ended(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_through_display_fromstr_and_serde() {
        for s in ItemStatus::ALL {
            let text = s.to_string();
            assert_eq!(text.parse::<ItemStatus>().ok(), Some(*s));
            let json = serde_json::to_string(s).expect("serialize");
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<ItemStatus>(&json).ok(), Some(*s));
        }
        for s in BatchStatus::ALL {
            assert_eq!(s.as_str().parse::<BatchStatus>().ok(), Some(*s));
        }
        assert_eq!(ItemStatus::NeedsInput.as_str(), "needs_input");
        assert_eq!(OnItemFailure::FailBatch.to_string(), "fail_batch");
    }

    #[test]
    fn a_parse_error_lists_the_valid_values() {
        let err = "Running"
            .parse::<BatchStatus>()
            .expect_err("capitalised is not a spelling");
        let msg = err.to_string();
        assert!(msg.contains("`Running`"), "{msg}");
        assert!(
            msg.contains("pending, running, paused, cancelling, completed, failed, cancelled"),
            "{msg}"
        );
        assert!(serde_json::from_str::<Mode>("\"both\"").is_err());
    }
}
