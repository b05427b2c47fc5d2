//! Stored records to wire views: the only place that decides what a client sees (never a
//! webhook secret, never a lease token).

use batchd_domain::wire::{BatchView, CurrentItem, EventView, ItemView, Progress, WebhookView};
use batchd_storage::{BatchRecord, EventRecord, ItemRecord};

pub(crate) fn batch_view(batch: BatchRecord, current: Option<&ItemRecord>) -> BatchView {
    BatchView {
        progress: batch.counts.progress(),
        current: current.map(|item| CurrentItem {
            item_id: item.id.clone(),
            index: item.index,
            step: item.step.clone(),
            message: item.message.clone(),
            progress: progress(item),
        }),
        webhook: batch.webhook.map(|w| WebhookView {
            url: w.url,
            events: w.events,
        }),
        id: batch.id,
        queue: batch.queue,
        session_id: batch.session_id,
        status: batch.status,
        mode: batch.mode,
        on_item_failure: batch.on_item_failure,
        priority: batch.priority,
        run_at: batch.run_at,
        counts: batch.counts,
        message: batch.message,
        error: batch.error,
        result: batch.result,
        metadata: batch.metadata,
        config: batch.config,
        created_at: batch.created_at,
        started_at: batch.started_at,
        updated_at: batch.updated_at,
        completed_at: batch.completed_at,
    }
}

fn progress(item: &ItemRecord) -> Option<Progress> {
    item.progress.map(|(current, total)| Progress { current, total })
}

/// An item as listed; `with_input` for `GET /v1/items/{id}`.
pub(crate) fn item_view(item: ItemRecord, with_input: bool) -> ItemView {
    ItemView {
        progress: progress(&item),
        id: item.id,
        batch_id: item.batch_id,
        index: item.index,
        custom_id: item.custom_id,
        status: item.status,
        position: item.position,
        attempts: item.attempts,
        max_attempts: item.max_attempts,
        step: item.step,
        message: item.message,
        result: item.result,
        error: item.error,
        question: item.question,
        answer: item.answer,
        next_attempt_at: item.next_attempt_at,
        created_at: item.created_at,
        started_at: item.started_at,
        completed_at: item.completed_at,
        input: with_input.then_some(item.input),
    }
}

pub(crate) fn event_view(event: EventRecord) -> EventView {
    EventView {
        seq: event.seq,
        batch_id: event.batch_id,
        item_id: event.item_id,
        item_index: event.item_index,
        event_type: event.event_type,
        step: event.step,
        message: event.message,
        data: event.data,
        at: event.at,
    }
}
