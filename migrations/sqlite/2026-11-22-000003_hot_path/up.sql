-- Fewer writes per item on the hot path: every item write changes `status`, so this index
-- was rewritten on each claim and each result. The batch-scoped queries use
-- items_index_unique (batch_id, item_index) instead.
DROP INDEX items_batch_status;
