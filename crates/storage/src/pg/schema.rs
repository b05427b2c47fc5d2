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
    }
}

diesel::table! {
    events (batch_id, seq) {
        batch_id -> Text,
        seq -> Int8,
        item_id -> Nullable<Text>,
        item_index -> Nullable<Int4>,
        event_type -> Text,
        step -> Nullable<Text>,
        message -> Nullable<Text>,
        data -> Nullable<Jsonb>,
        at -> Timestamptz,
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

diesel::joinable!(events -> batches (batch_id));
diesel::joinable!(items -> batches (batch_id));
diesel::joinable!(webhook_attempts -> webhook_deliveries (delivery_id));
diesel::joinable!(webhook_deliveries -> batches (batch_id));

diesel::allow_tables_to_appear_in_same_query!(
    batches,
    events,
    items,
    queue_states,
    webhook_attempts,
    webhook_deliveries,
);
