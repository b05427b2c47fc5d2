//! Creating, reading and listing batches: idempotency, tenancy, filters, cursors, positions.

use batchd_domain::{BatchStatus, EventType, ItemStatus};
use batchd_storage::{BatchFilter, CreateOutcome, NewBatch, PageRequest, Scope, StoreError};
use serde_json::json;
use time::Duration;

use crate::support::{Fixture, batch, conformance, sequential};

conformance!(
    create_writes_batch_items_and_first_event,
    items_with_nothing_of_their_own_are_written_whole,
    idempotent_replays_return_the_same_batch,
    client_ids_are_unique_across_tenants,
    tenants_never_see_each_other,
    list_filters_and_cursors,
    recent_items_page_in_creation_order_when_seqs_run_the_other_way,
    recent_items_go_on_from_cursors_of_earlier_versions_and_batch_ids_with_dots,
    recent_items_span_many_small_batches_and_pages_end_inside_or_between_them,
    positions_follow_claim_order,
    events_page_after_a_sequence_number,
    events_page_across_the_runs_they_are_stored_in,
);

async fn create_writes_batch_items_and_first_event(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 3)).await;
    assert_eq!(b.status, BatchStatus::Pending);
    assert_eq!((b.counts.total, b.counts.pending), (3, 3));
    assert_eq!(ids.len(), 3);
    let got = f.batch(&b.id).await;
    assert_eq!(got, b);
    let items = f.items(&b.id).await;
    assert_eq!(items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(items.iter().map(|i| i.index).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(items[1].custom_id.as_deref(), Some("c1"));
    assert_eq!(items[2].input["n"], 2);
    assert!(
        items
            .iter()
            .all(|i| i.status == ItemStatus::Pending && i.attempts == 0 && i.max_attempts == 3)
    );
    assert_eq!(f.event_types(&b.id).await, vec!["batch.created"]);
    let item = f
        .store
        .get_item(Scope::Tenant("acme"), &ids[0])
        .await
        .expect("get item");
    assert_eq!(item.position, Some(1));
}

/// Items with no custom id, config or attempts of their own (PostgreSQL inserts them with
/// only ids and inputs as arrays), and a batch where one item has a config and attempts of
/// its own (the general insert).
async fn items_with_nothing_of_their_own_are_written_whole(f: Fixture) {
    let mut plain = batch("default", 5);
    for item in &mut plain.items {
        item.custom_id = None;
    }
    let (b, ids) = f.submit(plain).await;
    let items = f.items(&b.id).await;
    assert_eq!(items.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(items.iter().map(|i| i.index).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    for (n, item) in items.iter().enumerate() {
        assert_eq!(item.input["n"], n, "item {n}'s input");
        assert_eq!(
            (
                item.custom_id.as_deref(),
                item.config.len(),
                item.max_attempts,
                item.attempts
            ),
            (None, 0, 3, 0)
        );
        assert_eq!(item.status, ItemStatus::Pending);
    }
    let mut mixed = batch("default", 3);
    for item in &mut mixed.items {
        item.custom_id = None;
    }
    mixed.items[1].config.insert("timeout_ms".into(), json!(5000));
    mixed.items[1].max_attempts = 5;
    let (m, _) = f.submit(mixed).await;
    let items = f.items(&m.id).await;
    assert_eq!(
        items
            .iter()
            .map(|i| (i.index, i.config.len(), i.max_attempts))
            .collect::<Vec<_>>(),
        vec![(0, 0, 3), (1, 1, 5), (2, 0, 3)]
    );
}

async fn idempotent_replays_return_the_same_batch(f: Fixture) {
    let with_key = NewBatch {
        idempotency_key: Some("k1".into()),
        ..batch("default", 2)
    };
    let (first, ids) = f.submit(with_key.clone()).await;
    // Same key, same body, a fresh server-side id: the existing batch.
    let replay = NewBatch {
        id: batchd_domain::new_batch_id(),
        ..with_key.clone()
    };
    match f.store.create_batch(replay).await.expect("replay") {
        CreateOutcome::Existing(b, replay_ids) => {
            assert_eq!(b.id, first.id);
            assert_eq!(replay_ids, ids);
        }
        CreateOutcome::Created(..) => panic!("a replay must not create a batch"),
    }
    // Same key, another body: a conflict, and nothing new is stored.
    let other = NewBatch {
        id: batchd_domain::new_batch_id(),
        request_hash: "h2".into(),
        ..with_key.clone()
    };
    assert!(matches!(
        f.store.create_batch(other).await,
        Err(StoreError::IdempotencyConflict)
    ));
    // The key is per tenant: another tenant may use it.
    let other_tenant = NewBatch {
        id: batchd_domain::new_batch_id(),
        tenant: "globex".into(),
        ..with_key
    };
    f.submit(other_tenant).await;
    // A client-chosen id works as a key too.
    let by_id = NewBatch {
        id: "job-1".into(),
        client_chose_id: true,
        ..batch("default", 1)
    };
    f.submit(by_id.clone()).await;
    assert!(matches!(f.store.create_batch(by_id.clone()).await, Ok(CreateOutcome::Existing(b, _)) if b.id == "job-1"));
    // An id and a key that name two different batches: a conflict.
    let both = NewBatch {
        idempotency_key: Some("k1".into()),
        ..by_id
    };
    assert!(matches!(
        f.store.create_batch(both).await,
        Err(StoreError::IdempotencyConflict)
    ));
    let all = f
        .store
        .list_batches(
            Scope::All,
            &BatchFilter::default(),
            &PageRequest {
                cursor: None,
                limit: 100,
            },
        )
        .await;
    assert_eq!(all.expect("list").rows.len(), 3);
}

async fn client_ids_are_unique_across_tenants(f: Fixture) {
    f.submit(NewBatch {
        id: "shared".into(),
        client_chose_id: true,
        ..batch("default", 1)
    })
    .await;
    let theirs = NewBatch {
        id: "shared".into(),
        client_chose_id: true,
        tenant: "globex".into(),
        ..batch("default", 1)
    };
    assert!(matches!(
        f.store.create_batch(theirs).await,
        Err(StoreError::IdempotencyConflict)
    ));
}

async fn tenants_never_see_each_other(f: Fixture) {
    let (b, ids) = f.submit(batch("default", 2)).await;
    let other = Scope::Tenant("globex");
    assert!(matches!(
        f.store.get_batch(other, &b.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.get_item(other, &ids[0]).await,
        Err(StoreError::NotFound)
    ));
    let page = PageRequest {
        cursor: None,
        limit: 10,
    };
    assert!(matches!(
        f.store.list_items(other, &b.id, None, &page).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.read_events(other, &b.id, 0, 10).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.cancel_batch(other, &b.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.pause_batch(other, &b.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.cancel_item(other, &ids[0]).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        f.store.answer_item(other, &ids[0], serde_json::json!(1)).await,
        Err(StoreError::NotFound)
    ));
    let listed = f
        .store
        .list_batches(other, &BatchFilter::default(), &page)
        .await
        .expect("list");
    assert!(listed.rows.is_empty());
    let since = f.clock.now() - Duration::hours(1);
    assert!(
        f.store
            .list_recent_items(other, since, &page)
            .await
            .expect("items")
            .rows
            .is_empty()
    );
    assert_eq!(
        f.store
            .list_recent_items(Scope::Tenant("acme"), since, &page)
            .await
            .expect("items")
            .rows
            .len(),
        2
    );
    assert_eq!(f.batch(&b.id).await.status, BatchStatus::Pending, "nothing changed");
}

/// Two submits that read the clock in one order and wrote their items in the other: the
/// later batch's items have the lower seqs. `list_recent_items` pages through creation time
/// and seq together, so a cursor inside the earlier batch skips none of the later one.
/// Recent items are listed through their batches; a cursor names the last item by its
/// batch's creation time, its batch's id (which a client may choose, dots and all) and its
/// index. Cursors of earlier versions named an item by its seq (`<micros>_<seq>`, or a bare
/// seq): the listing goes on after that item.
async fn recent_items_go_on_from_cursors_of_earlier_versions_and_batch_ids_with_dots(f: Fixture) {
    let since = f.clock.now() - Duration::hours(1);
    let mut dotted = batch("default", 3);
    dotted.id = "a.b.7".to_owned();
    dotted.client_chose_id = true;
    let (_, first) = f.submit(dotted).await;
    f.clock.advance(std::time::Duration::from_millis(1));
    let (_, second) = f.submit(batch("default", 2)).await;
    let everything: Vec<String> = first.iter().chain(&second).cloned().collect();
    let list = |cursor: Option<String>, limit: usize| {
        let page = PageRequest { cursor, limit };
        let store = f.store.clone();
        async move { store.list_recent_items(Scope::All, since, &page).await }
    };
    // One item a page: every cursor but the last names an item of the dotted batch or the next.
    let mut listed = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = list(cursor, 1).await.expect("list recent items");
        listed.extend(page.rows.into_iter().map(|i| i.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(listed, everything, "every item once, oldest first");
    // Item seqs count from 1 in a fresh database: the dotted batch's second item is seq 2.
    for old in ["2", "1765000000000000_2"] {
        let page = list(Some(old.to_owned()), 10)
            .await
            .expect("an earlier version's cursor");
        let ids: Vec<String> = page.rows.into_iter().map(|i| i.id).collect();
        assert_eq!(ids, everything[2..].to_vec(), "after seq 2, from {old:?}");
    }
    // A seq that names no item is a bad cursor.
    assert!(matches!(
        list(Some("999999".to_owned()), 10).await,
        Err(StoreError::InvalidCursor)
    ));
    for bad in ["1_.2", "1_a.b.x", "1_a.b.99999999999"] {
        assert!(
            matches!(list(Some(bad.to_owned()), 10).await, Err(StoreError::InvalidCursor)),
            "cursor {bad:?}"
        );
    }
}

/// More batches than are read at a time (100), of 1 and 3 items: pages that end between
/// batches and inside them list every item once, in order, on both paths (whole batches in
/// one statement, a batch that does not fit by index).
async fn recent_items_span_many_small_batches_and_pages_end_inside_or_between_them(f: Fixture) {
    let since = f.clock.now() - Duration::hours(1);
    let mut everything = Vec::new();
    for n in 0..130 {
        f.clock.advance(std::time::Duration::from_micros(1));
        let (_, ids) = f.submit(batch("default", if n % 10 == 0 { 3 } else { 1 })).await;
        everything.extend(ids);
    }
    for limit in [1000, 7, 3, 2] {
        let mut listed = Vec::new();
        let mut cursor = None;
        for _ in 0..everything.len() + 1 {
            let page = f
                .store
                .list_recent_items(Scope::Tenant("acme"), since, &PageRequest { cursor, limit })
                .await
                .expect("list recent items");
            assert!(page.rows.len() <= limit);
            listed.extend(page.rows.into_iter().map(|i| i.id));
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        assert_eq!(listed, everything, "pages of {limit}");
    }
}

async fn recent_items_page_in_creation_order_when_seqs_run_the_other_way(f: Fixture) {
    let since = f.clock.now() - Duration::hours(1);
    f.clock.advance(std::time::Duration::from_millis(10));
    let (_, later) = f.submit(batch("default", 3)).await;
    f.clock.rewind(std::time::Duration::from_millis(5));
    let (_, earlier) = f.submit(batch("default", 3)).await;
    let mut listed = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = f
            .store
            .list_recent_items(Scope::All, since, &PageRequest { cursor, limit: 2 })
            .await
            .expect("list recent items");
        listed.extend(page.rows.into_iter().map(|i| i.id));
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    let expected: Vec<String> = earlier.into_iter().chain(later).collect();
    assert_eq!(listed, expected, "every item once, oldest first");
    for bad in [
        "x",
        "1_x",
        "x_1",
        "99999999999999999999999999999999999_1",
        "170141183460469231731687303715884105727_1",
    ] {
        let page = PageRequest {
            cursor: Some(bad.to_owned()),
            limit: 2,
        };
        assert!(
            matches!(
                f.store.list_recent_items(Scope::All, since, &page).await,
                Err(StoreError::InvalidCursor)
            ),
            "cursor {bad:?}"
        );
    }
    // The batch list's cursors are read the same way: out of range is a bad cursor, not a panic.
    let page = PageRequest {
        cursor: Some("170141183460469231731687303715884105727_b".to_owned()),
        limit: 2,
    };
    assert!(matches!(
        f.store.list_batches(Scope::All, &BatchFilter::default(), &page).await,
        Err(StoreError::InvalidCursor)
    ));
}

async fn list_filters_and_cursors(f: Fixture) {
    let mut ids = Vec::new();
    for i in 0..5 {
        let session = if i % 2 == 0 { Some("s-even".to_owned()) } else { None };
        let queue = if i < 3 { "default" } else { "other" };
        let (b, _) = f
            .submit(NewBatch {
                session_id: session,
                ..batch(queue, 1)
            })
            .await;
        ids.push(b.id);
        f.clock.advance(std::time::Duration::from_millis(5));
    }
    f.store.pause_batch(Scope::All, &ids[1]).await.expect("pause");
    f.store.cancel_batch(Scope::All, &ids[2]).await.expect("cancel");
    let all = Scope::Tenant("acme");
    // Newest first, two per page, with cursors that walk the whole list once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = f
            .store
            .list_batches(
                all,
                &BatchFilter::default(),
                &PageRequest {
                    cursor: cursor.clone(),
                    limit: 2,
                },
            )
            .await
            .expect("page");
        assert!(page.rows.len() <= 2);
        seen.extend(page.rows.into_iter().map(|b| b.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let list = |filter: BatchFilter| {
        let store = f.store.clone();
        async move {
            store
                .list_batches(
                    all,
                    &filter,
                    &PageRequest {
                        cursor: None,
                        limit: 100,
                    },
                )
                .await
                .expect("list")
                .rows
                .into_iter()
                .map(|b| b.id)
                .collect::<Vec<_>>()
        }
    };
    let active = list(BatchFilter {
        statuses: BatchStatus::ACTIVE.to_vec(),
        ..Default::default()
    })
    .await;
    assert_eq!(active.len(), 4, "the cancelled batch is not active");
    assert!(!active.contains(&ids[2]));
    assert_eq!(
        list(BatchFilter {
            queue: Some("other".into()),
            ..Default::default()
        })
        .await,
        vec![ids[4].clone(), ids[3].clone()]
    );
    assert_eq!(
        list(BatchFilter {
            session_id: Some("s-even".into()),
            ..Default::default()
        })
        .await
        .len(),
        3
    );
    assert_eq!(
        list(BatchFilter {
            statuses: vec![BatchStatus::Paused],
            ..Default::default()
        })
        .await,
        vec![ids[1].clone()]
    );
    let bad = f
        .store
        .list_batches(
            all,
            &BatchFilter::default(),
            &PageRequest {
                cursor: Some("nope".into()),
                limit: 2,
            },
        )
        .await;
    assert!(matches!(bad, Err(StoreError::InvalidCursor)));
}

async fn positions_follow_claim_order(f: Fixture) {
    let (a, _) = f.submit(batch("emails", 3)).await;
    let (b, _) = f.submit(sequential("emails", 2)).await;
    let (urgent, _) = f
        .submit(NewBatch {
            priority: 5,
            ..batch("emails", 1)
        })
        .await;
    let (elsewhere, _) = f.submit(batch("other", 1)).await;
    let positions = |items: Vec<batchd_storage::ItemRecord>| items.into_iter().map(|i| i.position).collect::<Vec<_>>();
    assert_eq!(
        positions(f.items(&urgent.id).await),
        vec![Some(1)],
        "higher priority goes first"
    );
    assert_eq!(positions(f.items(&a.id).await), vec![Some(2), Some(3), Some(4)]);
    assert_eq!(
        positions(f.items(&b.id).await),
        vec![Some(5), Some(6)],
        "later sequential items count as ready"
    );
    assert_eq!(
        positions(f.items(&elsewhere.id).await),
        vec![Some(1)],
        "positions are per queue"
    );
    // Claiming the first two moves everyone up; running items have no position.
    let claimed = f.claim("emails", 2).await;
    assert_eq!(
        claimed.iter().map(|c| c.batch_id.clone()).collect::<Vec<_>>(),
        vec![urgent.id.clone(), a.id.clone()]
    );
    assert_eq!(positions(f.items(&a.id).await), vec![None, Some(1), Some(2)]);
    assert_eq!(positions(f.items(&b.id).await), vec![Some(3), Some(4)]);
    // A paused batch's items have no position and do not count for others.
    f.store.pause_batch(Scope::All, &a.id).await.expect("pause");
    assert_eq!(positions(f.items(&a.id).await), vec![None, None, None]);
    assert_eq!(positions(f.items(&b.id).await), vec![Some(1), Some(2)]);
    // A paused queue has no positions at all.
    f.store.set_queue_paused("emails", true).await.expect("pause queue");
    assert_eq!(positions(f.items(&b.id).await), vec![None, None]);
    // Filtering by status.
    let page = PageRequest {
        cursor: None,
        limit: 10,
    };
    let running = f
        .store
        .list_items(Scope::All, &a.id, Some(ItemStatus::Running), &page)
        .await
        .expect("filter");
    assert_eq!(running.rows.len(), 1);
}

async fn events_page_after_a_sequence_number(f: Fixture) {
    let (b, _) = f.submit(batch("default", 3)).await;
    for item in f.claim("default", 3).await {
        f.complete(&item).await;
    }
    let all = f.store.read_events(Scope::All, &b.id, 0, 100).await.expect("events");
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=all.len() as i64).collect::<Vec<_>>(),
        "dense per-batch sequence numbers"
    );
    let after = f.store.read_events(Scope::All, &b.id, 3, 2).await.expect("page");
    assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert_eq!(
        all.last().map(|e| e.event_type.to_string()),
        Some("batch.completed".to_owned())
    );
    assert_eq!(f.batch(&b.id).await.last_event_seq, all.len() as i64);
}

/// A claim of many items writes their events in a few runs, the like events of consecutive
/// items stored together: pages cut them anywhere, and every event names its own item.
async fn events_page_across_the_runs_they_are_stored_in(f: Fixture) {
    let (b, _) = f.submit(batch("default", 150)).await;
    let claimed = f.claim("default", 150).await;
    assert_eq!(claimed.len(), 150);
    f.complete_all(&claimed).await;
    let all = f.store.read_events(Scope::All, &b.id, 0, 1_000).await.expect("events");
    // created, started, 150 items started and completed, completed.
    assert_eq!(all.len(), 303);
    let ids: std::collections::HashMap<i32, &str> = claimed.iter().map(|c| (c.index, c.id.as_str())).collect();
    for e in all.iter().filter(|e| e.event_type.to_string().starts_with("item.")) {
        let index = e.item_index.expect("an item event names its item's index");
        assert_eq!(
            e.item_id.as_deref(),
            ids.get(&index).copied(),
            "event {} names its own item",
            e.seq
        );
    }
    let runs = f.db.count_batch_rows("event_runs", &b.id).await;
    assert!(
        runs <= 4,
        "303 events of one claim and one group of completions took {runs} runs"
    );
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=303).collect::<Vec<i64>>()
    );
    let started: Vec<i32> = all
        .iter()
        .filter(|e| e.event_type == EventType::ItemStarted)
        .filter_map(|e| e.item_index)
        .collect();
    assert_eq!(started, (0..150).collect::<Vec<i32>>(), "item.started in claim order");
    assert!(
        all.iter()
            .filter(|e| e.event_type == EventType::ItemCompleted)
            .all(|e| e.data == Some(json!({"attempt": 1})))
    );
    for (after, limit) in [(0, 1), (1, 7), (13, 50), (150, 100), (290, 100), (302, 5), (303, 5)] {
        let page = f
            .store
            .read_events(Scope::All, &b.id, after, limit)
            .await
            .expect("page");
        let want: Vec<i64> = all.iter().map(|e| e.seq).filter(|s| *s > after).take(limit).collect();
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            want,
            "after {after}, limit {limit}"
        );
        assert_eq!(
            page.first(),
            all.iter().find(|e| e.seq == after + 1),
            "after {after}: whole events"
        );
    }
}
