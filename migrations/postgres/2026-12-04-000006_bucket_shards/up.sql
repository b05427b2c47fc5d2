-- Each position count is kept in a few rows (`shard`), summed by readers: a submit and a
-- claim of the same bucket update different rows, so neither waits for the other's commit
-- (POSITION_SHARDS in crates/storage/src/common.rs). A shard's count may be negative; the
-- sum over a bucket's shards is its pending items.
ALTER TABLE queue_position_buckets DROP CONSTRAINT queue_position_buckets_pkey;
ALTER TABLE queue_position_buckets DROP CONSTRAINT queue_position_buckets_pending_check;
ALTER TABLE queue_position_buckets ADD COLUMN shard INTEGER NOT NULL DEFAULT 0;
ALTER TABLE queue_position_buckets ADD PRIMARY KEY (queue, priority, bucket, shard);
