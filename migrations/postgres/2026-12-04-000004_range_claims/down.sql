-- Items running under a range lease become plain pending items again (claimed anew: batchd
-- runs each item at least once).
DROP TABLE leases;
DROP TABLE queue_entries;
DROP INDEX batches_pending;
DROP INDEX batches_claimable;
ALTER TABLE batches DROP CONSTRAINT batches_unclaimed_pending;
ALTER TABLE batches DROP COLUMN unclaimed;
ALTER TABLE batches DROP COLUMN next_index;
DROP INDEX batches_seq;
ALTER TABLE batches DROP COLUMN seq;
ALTER TABLE items RESET (fillfactor);
CREATE INDEX items_claimable ON items (queue, priority DESC, seq) WHERE status = 'pending' AND NOT blocked;
CREATE INDEX items_pending ON items (queue, priority DESC, seq) WHERE status = 'pending';
CREATE INDEX items_running_leases ON items (lease_expires_at) WHERE status = 'running';
CREATE INDEX items_backoff ON items (queue, next_attempt_at, priority, seq)
    WHERE status = 'pending' AND next_attempt_at IS NOT NULL;

DELETE FROM queue_position_buckets;
INSERT INTO queue_position_buckets (queue, priority, bucket, pending)
SELECT queue, priority, seq / 1024, COUNT(*) FROM items WHERE status = 'pending' GROUP BY 1, 2, 3;

CREATE FUNCTION items_pending_inserted() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queue_position_buckets AS b (queue, priority, bucket, pending)
    SELECT queue, priority, seq / 1024, COUNT(*) FROM new_rows WHERE status = 'pending'
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (queue, priority, bucket) DO UPDATE SET pending = b.pending + EXCLUDED.pending;
    RETURN NULL;
END;
$$;

CREATE FUNCTION items_pending_updated() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM old_rows WHERE status = 'pending' UNION ALL SELECT 1 FROM new_rows WHERE status = 'pending'
    ) THEN
        RETURN NULL;
    END IF;
    WITH changes AS (
        SELECT queue, priority, bucket, SUM(change) AS change FROM (
            SELECT queue, priority, seq / 1024 AS bucket, -1 AS change FROM old_rows WHERE status = 'pending'
            UNION ALL
            SELECT queue, priority, seq / 1024, 1 FROM new_rows WHERE status = 'pending'
        ) AS c
        GROUP BY 1, 2, 3 HAVING SUM(change) <> 0
    ), lost AS (
        UPDATE queue_position_buckets AS b SET pending = b.pending + c.change
        FROM changes AS c
        WHERE c.change < 0 AND b.queue = c.queue AND b.priority = c.priority AND b.bucket = c.bucket
    )
    INSERT INTO queue_position_buckets AS b (queue, priority, bucket, pending)
    SELECT queue, priority, bucket, change FROM changes WHERE change > 0 ORDER BY 1, 2, 3
    ON CONFLICT (queue, priority, bucket) DO UPDATE SET pending = b.pending + EXCLUDED.pending;
    DELETE FROM queue_position_buckets AS b
    USING (SELECT DISTINCT queue, priority, seq / 1024 AS bucket FROM old_rows WHERE status = 'pending') AS o
    WHERE b.queue = o.queue AND b.priority = o.priority AND b.bucket = o.bucket AND b.pending = 0;
    RETURN NULL;
END;
$$;

CREATE FUNCTION items_pending_deleted() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    UPDATE queue_position_buckets AS b SET pending = b.pending - o.n
    FROM (
        SELECT queue, priority, seq / 1024 AS bucket, COUNT(*) AS n FROM old_rows WHERE status = 'pending'
        GROUP BY 1, 2, 3
    ) AS o
    WHERE b.queue = o.queue AND b.priority = o.priority AND b.bucket = o.bucket;
    DELETE FROM queue_position_buckets AS b
    USING (SELECT DISTINCT queue, priority, seq / 1024 AS bucket FROM old_rows WHERE status = 'pending') AS o
    WHERE b.queue = o.queue AND b.priority = o.priority AND b.bucket = o.bucket AND b.pending = 0;
    RETURN NULL;
END;
$$;

CREATE TRIGGER items_pending_insert AFTER INSERT ON items
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION items_pending_inserted();
CREATE TRIGGER items_pending_update AFTER UPDATE ON items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION items_pending_updated();
CREATE TRIGGER items_pending_delete AFTER DELETE ON items
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION items_pending_deleted();
