//! Event types of the per-batch timeline, SSE frames and webhooks.

string_enum!(
    /// The type of a timeline event; the spelling is what clients see.
    EventType, "event type" {
        BatchCreated => "batch.created",
        BatchStarted => "batch.started",
        BatchPaused => "batch.paused",
        BatchResumed => "batch.resumed",
        BatchCancelling => "batch.cancelling",
        BatchCancelled => "batch.cancelled",
        BatchCompleted => "batch.completed",
        BatchFailed => "batch.failed",
        BatchRetried => "batch.retried",
        ItemStarted => "item.started",
        ItemStep => "item.step",
        ItemProgress => "item.progress",
        ItemLog => "item.log",
        ItemCompleted => "item.completed",
        ItemFailed => "item.failed",
        ItemRetryScheduled => "item.retry_scheduled",
        ItemCancelled => "item.cancelled",
        ItemNeedsInput => "item.needs_input",
        ItemInputReceived => "item.input_received",
        ItemLeaseExpired => "item.lease_expired",
    }
);

impl EventType {
    /// The events a webhook sends when the batch does not choose.
    pub const WEBHOOK_DEFAULTS: &'static [EventType] = &[
        Self::ItemCompleted,
        Self::ItemFailed,
        Self::ItemNeedsInput,
        Self::BatchCompleted,
        Self::BatchFailed,
        Self::BatchCancelled,
    ];

    /// The event a batch's new terminal status writes.
    pub fn for_batch_status(status: crate::BatchStatus) -> Option<Self> {
        use crate::BatchStatus::*;
        Some(match status {
            Running => Self::BatchStarted,
            Paused => Self::BatchPaused,
            Cancelling => Self::BatchCancelling,
            Cancelled => Self::BatchCancelled,
            Completed => Self::BatchCompleted,
            Failed => Self::BatchFailed,
            Pending => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_spellings_round_trip() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>().ok(), Some(*t));
        }
        assert_eq!(EventType::ItemRetryScheduled.to_string(), "item.retry_scheduled");
        assert_eq!(EventType::ALL.len(), 20);
    }
}
