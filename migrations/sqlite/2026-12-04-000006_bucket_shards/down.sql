CREATE TABLE queue_position_buckets_summed (
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    bucket BIGINT NOT NULL,
    pending BIGINT NOT NULL CHECK (pending >= 0),
    PRIMARY KEY (queue, priority, bucket)
);
INSERT INTO queue_position_buckets_summed (queue, priority, bucket, pending)
SELECT queue, priority, bucket, SUM(pending) FROM queue_position_buckets GROUP BY 1, 2, 3;
DROP TABLE queue_position_buckets;
ALTER TABLE queue_position_buckets_summed RENAME TO queue_position_buckets;
