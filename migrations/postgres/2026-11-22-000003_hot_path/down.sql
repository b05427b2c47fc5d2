CREATE INDEX items_batch_status ON items (batch_id, status);
ALTER TABLE events ADD CONSTRAINT events_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES batches (id) ON DELETE CASCADE;
ALTER TABLE items ADD CONSTRAINT items_batch_id_fkey FOREIGN KEY (batch_id) REFERENCES batches (id) ON DELETE CASCADE;
