// @generated automatically by Diesel CLI.

diesel::table! {
    batches (id) {
        id -> Text,
        tenant -> Text,
        queue -> Text,
        session_id -> Nullable<Text>,
        mode -> Text,
        on_item_failure -> Text,
        priority -> Integer,
        run_at -> Nullable<TimestamptzSqlite>,
        config -> Json,
        webhook_url -> Nullable<Text>,
        webhook_secret -> Nullable<Text>,
        webhook_events -> Nullable<Json>,
        metadata -> Nullable<Json>,
        result -> Nullable<Json>,
        status -> Text,
        total -> BigInt,
        pending -> BigInt,
        running -> BigInt,
        completed -> BigInt,
        failed -> BigInt,
        cancelled -> BigInt,
        needs_input -> BigInt,
        message -> Nullable<Text>,
        error -> Nullable<Text>,
        idempotency_key -> Nullable<Text>,
        request_hash -> Text,
        last_event_seq -> BigInt,
        created_at -> TimestamptzSqlite,
        started_at -> Nullable<TimestamptzSqlite>,
        updated_at -> TimestamptzSqlite,
        completed_at -> Nullable<TimestamptzSqlite>,
    }
}

diesel::table! {
    events (batch_id, seq) {
        batch_id -> Text,
        seq -> BigInt,
        item_id -> Nullable<Text>,
        item_index -> Nullable<Integer>,
        event_type -> Text,
        step -> Nullable<Text>,
        message -> Nullable<Text>,
        data -> Nullable<Json>,
        at -> TimestamptzSqlite,
    }
}

diesel::table! {
    items (seq) {
        seq -> BigInt,
        id -> Text,
        batch_id -> Text,
        tenant -> Text,
        queue -> Text,
        priority -> Integer,
        item_index -> Integer,
        custom_id -> Nullable<Text>,
        input -> Json,
        config -> Json,
        status -> Text,
        blocked -> Bool,
        attempts -> Integer,
        max_attempts -> Integer,
        next_attempt_at -> Nullable<TimestamptzSqlite>,
        lease_owner -> Nullable<Text>,
        lease_token -> Nullable<Text>,
        lease_expires_at -> Nullable<TimestamptzSqlite>,
        step -> Nullable<Text>,
        message -> Nullable<Text>,
        progress_current -> Nullable<BigInt>,
        progress_total -> Nullable<BigInt>,
        result -> Nullable<Json>,
        error -> Nullable<Text>,
        question -> Nullable<Json>,
        answer -> Nullable<Json>,
        cancel_reason -> Nullable<Text>,
        created_at -> TimestamptzSqlite,
        started_at -> Nullable<TimestamptzSqlite>,
        updated_at -> TimestamptzSqlite,
        completed_at -> Nullable<TimestamptzSqlite>,
    }
}

diesel::table! {
    queue_states (name) {
        name -> Text,
        paused -> Bool,
        updated_at -> TimestamptzSqlite,
    }
}

diesel::table! {
    webhook_attempts (delivery_id, attempt) {
        delivery_id -> Text,
        attempt -> Integer,
        at -> TimestamptzSqlite,
        status_code -> Nullable<Integer>,
        latency_ms -> BigInt,
        error -> Nullable<Text>,
        response_body -> Nullable<Text>,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Text,
        batch_id -> Text,
        event_seq -> BigInt,
        event_type -> Text,
        item_id -> Nullable<Text>,
        url -> Text,
        payload -> Text,
        status -> Text,
        attempts -> Integer,
        next_attempt_at -> Nullable<TimestamptzSqlite>,
        lease_token -> Nullable<Text>,
        lease_expires_at -> Nullable<TimestamptzSqlite>,
        created_at -> TimestamptzSqlite,
        updated_at -> TimestamptzSqlite,
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
