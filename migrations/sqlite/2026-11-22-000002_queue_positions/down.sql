DROP INDEX batches_waiting;
DROP INDEX items_backoff;
DROP TRIGGER items_pending_delete;
DROP TRIGGER items_pending_leave;
DROP TRIGGER items_pending_enter;
DROP TRIGGER items_pending_insert;
DROP TABLE queue_position_buckets;
