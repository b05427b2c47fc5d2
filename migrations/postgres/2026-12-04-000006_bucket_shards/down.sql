CREATE TEMPORARY TABLE bucket_sums AS
SELECT queue, priority, bucket, SUM(pending)::bigint AS pending FROM queue_position_buckets GROUP BY 1, 2, 3;
DELETE FROM queue_position_buckets;
ALTER TABLE queue_position_buckets DROP CONSTRAINT queue_position_buckets_pkey;
ALTER TABLE queue_position_buckets DROP COLUMN shard;
ALTER TABLE queue_position_buckets ADD PRIMARY KEY (queue, priority, bucket);
INSERT INTO queue_position_buckets (queue, priority, bucket, pending) SELECT queue, priority, bucket, pending FROM bucket_sums;
ALTER TABLE queue_position_buckets ADD CONSTRAINT queue_position_buckets_pending_check CHECK (pending >= 0);
DROP TABLE bucket_sums;
