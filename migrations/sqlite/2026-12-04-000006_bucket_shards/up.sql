-- Each position count is kept in a few rows (`shard`), summed by readers, as on PostgreSQL
-- (POSITION_SHARDS in crates/storage/src/common.rs). A shard's count may be negative; the
-- sum over a bucket's shards is its pending items.
CREATE TABLE queue_position_buckets_sharded (
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    bucket BIGINT NOT NULL,
    shard INTEGER NOT NULL DEFAULT 0,
    pending BIGINT NOT NULL,
    PRIMARY KEY (queue, priority, bucket, shard)
);
INSERT INTO queue_position_buckets_sharded (queue, priority, bucket, shard, pending)
SELECT queue, priority, bucket, 0, pending FROM queue_position_buckets;
DROP TABLE queue_position_buckets;
ALTER TABLE queue_position_buckets_sharded RENAME TO queue_position_buckets;
