DROP INDEX batches_waiting;
DROP INDEX items_backoff;
DROP TRIGGER items_pending_delete ON items;
DROP TRIGGER items_pending_update ON items;
DROP TRIGGER items_pending_insert ON items;
DROP FUNCTION items_pending_deleted();
DROP FUNCTION items_pending_updated();
DROP FUNCTION items_pending_inserted();
DROP TABLE queue_position_buckets;
