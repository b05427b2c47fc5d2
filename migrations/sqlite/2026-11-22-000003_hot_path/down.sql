CREATE INDEX items_batch_status ON items (batch_id, status);
