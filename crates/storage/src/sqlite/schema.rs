// @generated automatically by Diesel CLI.

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

    batches (id) {
        id -> Text,
        tenant -> Text,
        queue -> Text,
        session_id -> Nullable<Text>,
        mode -> Text,
        on_item_failure -> Text,
        priority -> Integer,
        run_at -> Nullable<UnixMicros>,
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
        created_at -> UnixMicros,
        started_at -> Nullable<UnixMicros>,
        updated_at -> UnixMicros,
        completed_at -> Nullable<UnixMicros>,
        seq -> BigInt,
        next_index -> Integer,
        unclaimed -> BigInt,
    }
}

diesel::table! {
    event_runs (batch_id, last_seq) {
        batch_id -> Text,
        first_seq -> BigInt,
        last_seq -> BigInt,
        events -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

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
        next_attempt_at -> Nullable<UnixMicros>,
        lease_owner -> Nullable<Text>,
        lease_token -> Nullable<Text>,
        lease_expires_at -> Nullable<UnixMicros>,
        step -> Nullable<Text>,
        message -> Nullable<Text>,
        progress_current -> Nullable<BigInt>,
        progress_total -> Nullable<BigInt>,
        result -> Nullable<Json>,
        error -> Nullable<Text>,
        question -> Nullable<Json>,
        answer -> Nullable<Json>,
        cancel_reason -> Nullable<Text>,
        created_at -> UnixMicros,
        started_at -> Nullable<UnixMicros>,
        updated_at -> UnixMicros,
        completed_at -> Nullable<UnixMicros>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

    leases (id) {
        id -> BigInt,
        batch_id -> Text,
        queue -> Text,
        first_index -> Integer,
        last_index -> Integer,
        item_seq -> Nullable<BigInt>,
        owner -> Text,
        secret -> Text,
        running -> Integer,
        started_at -> UnixMicros,
        expires_at -> UnixMicros,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

    queue_entries (item_seq) {
        item_seq -> BigInt,
        batch_id -> Text,
        queue -> Text,
        priority -> Integer,
        batch_seq -> BigInt,
        item_index -> Integer,
        blocked -> Bool,
        not_before -> Nullable<UnixMicros>,
    }
}

diesel::table! {
    queue_position_buckets (queue, priority, bucket, shard) {
        queue -> Text,
        priority -> Integer,
        bucket -> BigInt,
        shard -> Integer,
        pending -> BigInt,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

    queue_states (name) {
        name -> Text,
        paused -> Bool,
        updated_at -> UnixMicros,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

    webhook_attempts (delivery_id, attempt) {
        delivery_id -> Text,
        attempt -> Integer,
        at -> UnixMicros,
        status_code -> Nullable<Integer>,
        latency_ms -> BigInt,
        error -> Nullable<Text>,
        response_body -> Nullable<Text>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use crate::sqlite::micros::UnixMicros;

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
        next_attempt_at -> Nullable<UnixMicros>,
        lease_token -> Nullable<Text>,
        lease_expires_at -> Nullable<UnixMicros>,
        created_at -> UnixMicros,
        updated_at -> UnixMicros,
    }
}

diesel::joinable!(event_runs -> batches (batch_id));
diesel::joinable!(items -> batches (batch_id));
diesel::joinable!(leases -> batches (batch_id));
diesel::joinable!(queue_entries -> batches (batch_id));
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
