// @generated automatically by Diesel CLI.

diesel::table! {
    batches (id) {
        id -> Text,
        tenant -> Text,
        queue -> Text,
        session_id -> Nullable<Text>,
        mode -> Text,
        on_item_failure -> Text,
        priority -> Int4,
        run_at -> Nullable<Timestamptz>,
        config -> Jsonb,
        webhook_url -> Nullable<Text>,
        webhook_secret -> Nullable<Text>,
        webhook_events -> Nullable<Jsonb>,
        metadata -> Nullable<Jsonb>,
        result -> Nullable<Jsonb>,
        status -> Text,
        total -> Int8,
        pending -> Int8,
        running -> Int8,
        completed -> Int8,
        failed -> Int8,
        cancelled -> Int8,
        needs_input -> Int8,
        message -> Nullable<Text>,
        error -> Nullable<Text>,
        idempotency_key -> Nullable<Text>,
        request_hash -> Text,
        last_event_seq -> Int8,
        created_at -> Timestamptz,
        started_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        completed_at -> Nullable<Timestamptz>,
        seq -> Int8,
        next_index -> Int4,
        unclaimed -> Int8,
    }
}

diesel::table! {
    event_runs (batch_id, last_seq) {
        batch_id -> Text,
        first_seq -> Int8,
        last_seq -> Int8,
        events -> Text,
    }
}

diesel::table! {
    items (seq) {
        seq -> Int8,
        id -> Text,
        batch_id -> Text,
        tenant -> Text,
        queue -> Text,
        priority -> Int4,
        item_index -> Int4,
        custom_id -> Nullable<Text>,
        input -> Jsonb,
        config -> Jsonb,
        status -> Text,
        blocked -> Bool,
        attempts -> Int4,
        max_attempts -> Int4,
        next_attempt_at -> Nullable<Timestamptz>,
        lease_owner -> Nullable<Text>,
        lease_token -> Nullable<Text>,
        lease_expires_at -> Nullable<Timestamptz>,
        step -> Nullable<Text>,
        message -> Nullable<Text>,
        progress_current -> Nullable<Int8>,
        progress_total -> Nullable<Int8>,
        result -> Nullable<Jsonb>,
        error -> Nullable<Text>,
        question -> Nullable<Jsonb>,
        answer -> Nullable<Jsonb>,
        cancel_reason -> Nullable<Text>,
        created_at -> Timestamptz,
        started_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        completed_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    leases (id) {
        id -> Int8,
        batch_id -> Text,
        queue -> Text,
        first_index -> Int4,
        last_index -> Int4,
        item_seq -> Nullable<Int8>,
        owner -> Text,
        secret -> Text,
        running -> Int4,
        started_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    queue_entries (item_seq) {
        item_seq -> Int8,
        batch_id -> Text,
        queue -> Text,
        priority -> Int4,
        batch_seq -> Int8,
        item_index -> Int4,
        blocked -> Bool,
        not_before -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    queue_position_buckets (queue, priority, bucket, shard) {
        queue -> Text,
        priority -> Int4,
        bucket -> Int8,
        pending -> Int8,
        shard -> Int4,
    }
}

diesel::table! {
    queue_states (name) {
        name -> Text,
        paused -> Bool,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    webhook_attempts (delivery_id, attempt) {
        delivery_id -> Text,
        attempt -> Int4,
        at -> Timestamptz,
        status_code -> Nullable<Int4>,
        latency_ms -> Int8,
        error -> Nullable<Text>,
        response_body -> Nullable<Text>,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Text,
        batch_id -> Text,
        event_seq -> Int8,
        event_type -> Text,
        item_id -> Nullable<Text>,
        url -> Text,
        payload -> Text,
        status -> Text,
        attempts -> Int4,
        next_attempt_at -> Nullable<Timestamptz>,
        lease_token -> Nullable<Text>,
        lease_expires_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::joinable!(webhook_attempts -> webhook_deliveries (delivery_id));
diesel::joinable!(webhook_deliveries -> batches (batch_id));

diesel::allow_tables_to_appear_in_same_query!(
    batches,
    event_runs,
    items,
    leases,
    queue_entries,
    queue_position_buckets,
    queue_states,
    webhook_attempts,
    webhook_deliveries,
);
