//! A batch's timeline: as pages and as a Server-Sent Events stream, after the batch has
//! ended and while it runs.

use batchd_client::wire::EventView;
use batchd_client::{Client, EventType};
use batchd_testkit::TestServer;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::json;

use crate::{DONE_WITHIN, assert_completed, demo_batch, on_both_backends, run_to_end};

on_both_backends!(
    the_timeline_pages_in_seq_order,
    the_stream_of_an_ended_batch_replays_the_timeline_and_ends,
    the_stream_resumes_after_the_last_event_id,
    the_stream_follows_a_running_batch_to_its_end,
);

/// The whole timeline, page by page.
async fn all_events(client: &Client, batch_id: &str, page: u32) -> Vec<EventView> {
    let mut events = Vec::new();
    let mut after = None;
    loop {
        let list = client
            .batch_events(batch_id, after, Some(page))
            .await
            .expect("a page of events");
        let Some(last) = list.events.last() else {
            return events;
        };
        after = Some(last.seq);
        events.extend(list.events);
    }
}

fn seqs(events: &[EventView]) -> Vec<i64> {
    events.iter().map(|event| event.seq).collect()
}

fn count(events: &[EventView], event_type: EventType) -> usize {
    events.iter().filter(|event| event.event_type == event_type).count()
}

async fn the_timeline_pages_in_seq_order(server: &TestServer) {
    let client = server.client();
    let batch = run_to_end(&client, &demo_batch(3)).await;
    assert_completed(&batch, 3);

    let whole = client
        .batch_events(&batch.id, None, None)
        .await
        .expect("the timeline")
        .events;
    assert!(
        whole.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "{:?}",
        seqs(&whole)
    );
    assert!(whole.iter().all(|event| event.batch_id == batch.id));
    assert_eq!(whole.first().map(|e| e.event_type), Some(EventType::BatchCreated));
    assert_eq!(whole.last().map(|e| e.event_type), Some(EventType::BatchCompleted));
    assert_eq!(count(&whole, EventType::ItemStarted), 3);
    assert_eq!(count(&whole, EventType::ItemCompleted), 3);
    for event in whole.iter().filter(|e| e.event_type == EventType::ItemCompleted) {
        assert!(event.item_id.is_some() && event.item_index.is_some(), "{event:?}");
    }

    let paged = all_events(&client, &batch.id, 2).await;
    assert_eq!(paged, whole, "pages of two add up to the whole timeline");
    let last = whole.last().expect("events").seq;
    let after_last = client
        .batch_events(&batch.id, Some(last), None)
        .await
        .expect("an empty page");
    assert!(after_last.events.is_empty());
}

async fn the_stream_of_an_ended_batch_replays_the_timeline_and_ends(server: &TestServer) {
    let client = server.client();
    let batch = run_to_end(&client, &demo_batch(2)).await;
    let timeline = all_events(&client, &batch.id, 100).await;

    let streamed: Vec<EventView> =
        tokio::time::timeout(DONE_WITHIN, client.events_stream(&batch.id, None).try_collect())
            .await
            .expect("the stream of an ended batch ends")
            .expect("every frame is an event");
    assert_eq!(seqs(&streamed), seqs(&timeline), "frames in seq order, none missing");
    assert_eq!(
        streamed, timeline,
        "a frame's data is the event as the timeline shows it"
    );
}

async fn the_stream_resumes_after_the_last_event_id(server: &TestServer) {
    let client = server.client();
    let batch = run_to_end(&client, &demo_batch(2)).await;
    let timeline = all_events(&client, &batch.id, 100).await;
    let middle = timeline[timeline.len() / 2].seq;

    let resumed: Vec<EventView> =
        tokio::time::timeout(DONE_WITHIN, client.events_stream(&batch.id, Some(middle)).try_collect())
            .await
            .expect("the stream ends")
            .expect("every frame is an event");
    let expected: Vec<i64> = seqs(&timeline).into_iter().filter(|seq| *seq > middle).collect();
    assert!(!expected.is_empty());
    assert_eq!(seqs(&resumed), expected, "only what came after Last-Event-ID");

    let mut after_the_end = client.events_stream(&batch.id, timeline.last().map(|e| e.seq));
    let nothing = tokio::time::timeout(DONE_WITHIN, after_the_end.next())
        .await
        .expect("the stream ends");
    assert!(nothing.is_none(), "{nothing:?}");

    let unknown = client
        .events_stream("no-such-batch", None)
        .next()
        .await
        .expect("an answer")
        .expect_err("no such batch");
    assert_eq!(unknown.code(), Some("not_found"));
}

async fn the_stream_follows_a_running_batch_to_its_end(server: &TestServer) {
    let client = server.client();
    // Slow enough that the stream opens while items still run.
    let body = json!({"items": [
        {"input": {"sleep_ms": 300, "steps": ["fetch", "write"]}},
        {"input": {"sleep_ms": 300}},
    ]});
    let id = client.submit_json(&body, None).await.expect("accepted").batch.id;
    let streamed: Vec<EventView> = tokio::time::timeout(DONE_WITHIN, client.events_stream(&id, None).try_collect())
        .await
        .expect("the stream ends once the batch has ended")
        .expect("every frame is an event");
    assert!(
        streamed.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "{:?}",
        seqs(&streamed)
    );
    assert_eq!(streamed.first().map(|e| e.event_type), Some(EventType::BatchCreated));
    assert_eq!(streamed.last().map(|e| e.event_type), Some(EventType::BatchCompleted));
    assert_eq!(count(&streamed, EventType::ItemStep), 2, "both steps of the first item");
    assert_eq!(count(&streamed, EventType::ItemCompleted), 2);

    let batch = client.batch(&id).await.expect("the batch");
    assert_completed(&batch, 2);
    assert_eq!(
        streamed,
        all_events(&client, &id, 100).await,
        "live or replayed, the same timeline"
    );
}
