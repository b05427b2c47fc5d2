//! The webhook outbox: deliveries written with the change for the events the batch chose,
//! claimed under a lease by one dispatcher at a time, and every attempt recorded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use batchd_domain::{DeliveryStatus, EventType};
use batchd_storage::{
    DeliveryAttempt, DeliveryNext, NewBatch, NewWebhook, Notice, PageRequest, Scope, Store, StoreError,
};
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::support::{Fixture, batch, conformance};

conformance!(
    deliveries_follow_the_batchs_event_selection,
    a_claimed_delivery_is_leased_and_its_attempts_recorded,
    a_stale_lease_token_records_nothing,
    an_expired_delivery_lease_is_claimable_again,
    two_dispatchers_never_claim_the_same_delivery,
    deliveries_are_listed_per_tenant_and_paged,
);

const LEASE: Duration = Duration::from_secs(30);

fn with_webhook(n: usize, events: &[EventType]) -> NewBatch {
    NewBatch {
        webhook: Some(NewWebhook {
            url: "https://example.com/hook".to_owned(),
            secret: Some("s3cret".to_owned()),
            events: events.to_vec(),
        }),
        ..batch("q", n)
    }
}

/// Submits a batch with a webhook and runs every item to completion.
async fn completed_batch(f: &Fixture, n: usize, events: &[EventType]) -> String {
    let (b, _) = f.submit(with_webhook(n, events)).await;
    loop {
        let claimed = f.claim("q", 100).await;
        if claimed.is_empty() {
            break;
        }
        for item in &claimed {
            f.complete(item).await;
        }
    }
    b.id
}

async fn deliveries(store: &dyn Store, batch_id: &str) -> Vec<batchd_storage::DeliveryRecord> {
    store
        .list_deliveries(
            Scope::All,
            batch_id,
            &PageRequest {
                cursor: None,
                limit: 1_000,
            },
        )
        .await
        .expect("list deliveries")
        .rows
}

fn attempt(at: OffsetDateTime, status_code: Option<i32>) -> DeliveryAttempt {
    DeliveryAttempt {
        at,
        status_code,
        latency_ms: 12,
        error: status_code.filter(|c| *c >= 300).map(|c| format!("HTTP {c}")),
        response_body: Some("ok".to_owned()),
    }
}

async fn deliveries_follow_the_batchs_event_selection(f: Fixture) {
    let mut notices = f.store.subscribe();
    let defaults = completed_batch(&f, 2, EventType::WEBHOOK_DEFAULTS).await;
    let types: Vec<String> = deliveries(f.store.as_ref(), &defaults)
        .await
        .iter()
        .map(|d| d.event_type.to_string())
        .collect();
    assert_eq!(types, ["item.completed", "item.completed", "batch.completed"]);
    let only_batch = completed_batch(&f, 2, &[EventType::BatchCompleted, EventType::BatchStarted]).await;
    let types: Vec<String> = deliveries(f.store.as_ref(), &only_batch)
        .await
        .iter()
        .map(|d| d.event_type.to_string())
        .collect();
    assert_eq!(types, ["batch.started", "batch.completed"]);
    let none = f.submit(batch("q", 1)).await.0.id;
    assert!(deliveries(f.store.as_ref(), &none).await.is_empty());
    // Writing deliveries wakes the dispatchers.
    let woke = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if notices.recv().await.expect("a notice") == Notice::Webhooks {
                return;
            }
        }
    })
    .await;
    assert!(woke.is_ok(), "no Notice::Webhooks was published");
}

async fn a_claimed_delivery_is_leased_and_its_attempts_recorded(f: Fixture) {
    let id = completed_batch(&f, 1, &[EventType::BatchCompleted]).await;
    let claimed = f.store.claim_deliveries(10, LEASE).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let due = &claimed[0];
    assert_eq!(due.batch_id, id);
    assert_eq!(due.event_type, EventType::BatchCompleted);
    assert_eq!(due.secret.as_deref(), Some("s3cret"));
    assert_eq!(due.attempts, 0);
    let body: serde_json::Value = serde_json::from_str(&due.payload).expect("a JSON payload");
    assert_eq!(body["id"], due.id.as_str());
    assert_eq!(body["type"], "batch.completed");
    assert!(
        f.store.claim_deliveries(10, LEASE).await.expect("claim").is_empty(),
        "a leased delivery is not claimed twice"
    );

    let retry_at = f.clock.now() + Duration::from_secs(5);
    let recorded = f
        .store
        .record_delivery_attempt(
            &due.id,
            &due.lease_token,
            attempt(f.clock.now(), Some(500)),
            DeliveryNext::RetryAt(retry_at),
        )
        .await
        .expect("record");
    assert!(recorded);
    assert!(
        f.store.claim_deliveries(10, LEASE).await.expect("claim").is_empty(),
        "not due yet"
    );
    f.clock.advance(Duration::from_secs(5));
    let again = f.store.claim_deliveries(10, LEASE).await.expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, due.id);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].payload, due.payload, "the same body on every attempt");
    assert!(
        f.store
            .record_delivery_attempt(
                &due.id,
                &again[0].lease_token,
                attempt(f.clock.now(), Some(204)),
                DeliveryNext::Delivered
            )
            .await
            .expect("record")
    );
    f.clock.advance(Duration::from_secs(3_600));
    assert!(
        f.store.claim_deliveries(10, LEASE).await.expect("claim").is_empty(),
        "delivered is final"
    );

    let listed = deliveries(f.store.as_ref(), &id).await;
    assert_eq!(listed.len(), 1);
    let d = &listed[0];
    assert_eq!(d.status, DeliveryStatus::Delivered);
    assert_eq!(d.next_attempt_at, None);
    let codes: Vec<Option<i32>> = d.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [Some(500), Some(204)]);
    assert_eq!(d.attempts[0].attempt, 1);
    assert_eq!(d.attempts[0].error.as_deref(), Some("HTTP 500"));
    assert_eq!(d.attempts[1].attempt, 2);
    assert_eq!(d.attempts[1].response_body.as_deref(), Some("ok"));
}

async fn a_stale_lease_token_records_nothing(f: Fixture) {
    let id = completed_batch(&f, 1, &[EventType::BatchCompleted]).await;
    let due = f.store.claim_deliveries(1, LEASE).await.expect("claim").remove(0);
    for token in ["not-the-token", ""] {
        let recorded = f
            .store
            .record_delivery_attempt(
                &due.id,
                token,
                attempt(f.clock.now(), Some(200)),
                DeliveryNext::Delivered,
            )
            .await
            .expect("record");
        assert!(!recorded, "a wrong token is refused");
    }
    let d = deliveries(f.store.as_ref(), &id).await.remove(0);
    assert_eq!(d.status, DeliveryStatus::Pending);
    assert!(d.attempts.is_empty());
    // Once recorded, the token is spent.
    assert!(
        f.store
            .record_delivery_attempt(
                &due.id,
                &due.lease_token,
                attempt(f.clock.now(), None),
                DeliveryNext::Failed
            )
            .await
            .expect("record")
    );
    assert!(
        !f.store
            .record_delivery_attempt(
                &due.id,
                &due.lease_token,
                attempt(f.clock.now(), Some(200)),
                DeliveryNext::Delivered
            )
            .await
            .expect("record")
    );
    let d = deliveries(f.store.as_ref(), &id).await.remove(0);
    assert_eq!(d.status, DeliveryStatus::Failed);
    assert_eq!(d.attempts.len(), 1);
}

async fn an_expired_delivery_lease_is_claimable_again(f: Fixture) {
    completed_batch(&f, 1, &[EventType::BatchCompleted]).await;
    let first = f.store.claim_deliveries(1, LEASE).await.expect("claim").remove(0);
    f.clock.advance(LEASE - Duration::from_secs(1));
    assert!(f.store.claim_deliveries(1, LEASE).await.expect("claim").is_empty());
    f.clock.advance(Duration::from_secs(2));
    let second = f.store.claim_deliveries(1, LEASE).await.expect("claim").remove(0);
    assert_eq!(second.id, first.id);
    assert_ne!(second.lease_token, first.lease_token);
    assert_eq!(second.attempts, 0, "the dead dispatcher recorded nothing");
    assert!(
        !f.store
            .record_delivery_attempt(
                &first.id,
                &first.lease_token,
                attempt(f.clock.now(), Some(200)),
                DeliveryNext::Delivered
            )
            .await
            .expect("record"),
        "the first lease is gone"
    );
    assert!(
        f.store
            .record_delivery_attempt(
                &second.id,
                &second.lease_token,
                attempt(f.clock.now(), Some(200)),
                DeliveryNext::Delivered
            )
            .await
            .expect("record")
    );
}

async fn two_dispatchers_never_claim_the_same_delivery(f: Fixture) {
    const ITEMS: usize = 150;
    let id = completed_batch(&f, ITEMS, EventType::WEBHOOK_DEFAULTS).await;
    let expected: HashSet<String> = deliveries(f.store.as_ref(), &id)
        .await
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(expected.len(), ITEMS + 1);
    let other = f.reopen().await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for store in [f.store.clone(), other.clone(), f.store.clone(), other] {
        let seen = seen.clone();
        let now = f.clock.now();
        tasks.push(tokio::spawn(async move {
            loop {
                let claimed = store.claim_deliveries(7, LEASE).await.expect("claim");
                if claimed.is_empty() {
                    return;
                }
                for due in claimed {
                    seen.lock().await.push(due.id.clone());
                    let ok = store
                        .record_delivery_attempt(
                            &due.id,
                            &due.lease_token,
                            attempt(now, Some(200)),
                            DeliveryNext::Delivered,
                        )
                        .await
                        .expect("record");
                    assert!(ok, "the claimer holds its lease");
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the claimers finish")
            .expect("a claimer panicked");
    }
    let seen = seen.lock().await.clone();
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), unique.len(), "a delivery was claimed twice");
    assert_eq!(unique, expected);
    assert!(
        deliveries(f.store.as_ref(), &id)
            .await
            .iter()
            .all(|d| d.status == DeliveryStatus::Delivered && d.attempts.len() == 1)
    );
}

async fn deliveries_are_listed_per_tenant_and_paged(f: Fixture) {
    let id = completed_batch(&f, 5, EventType::WEBHOOK_DEFAULTS).await;
    let err = f
        .store
        .list_deliveries(
            Scope::Tenant("intruder"),
            &id,
            &PageRequest {
                cursor: None,
                limit: 10,
            },
        )
        .await
        .expect_err("another tenant's batch");
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    let mut cursor = None;
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let page = f
            .store
            .list_deliveries(Scope::Tenant("acme"), &id, &PageRequest { cursor, limit: 2 })
            .await
            .expect("a page");
        pages += 1;
        assert!(page.rows.len() <= 2);
        ids.extend(page.rows.into_iter().map(|d| d.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let all: Vec<String> = deliveries(f.store.as_ref(), &id)
        .await
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, all);
    assert_eq!(all.len(), 6);
}
