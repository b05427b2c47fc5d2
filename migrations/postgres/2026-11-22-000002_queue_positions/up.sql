-- Queue positions without counting the queue (DESIGN.md section 3). The pending items
-- (blocked ones included) of each queue and priority are counted per bucket of 1,024 `seq`
-- values, so the pending items ahead of an item are a sum over a few buckets plus a count
-- of at most 1,023 index entries in its own bucket. POSITION_BUCKET in
-- crates/storage/src/common.rs must be the same 1024.
-- Triggers keep the counts, so no code path can forget them. They run once per statement
-- over its transition tables, so a claim of 100 items or an insert of 1,000 changes each
-- bucket it touches once, in key order. A bucket whose count reaches zero is deleted.

CREATE TABLE queue_position_buckets (
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    bucket BIGINT NOT NULL,
    pending BIGINT NOT NULL CHECK (pending >= 0),
    PRIMARY KEY (queue, priority, bucket)
);

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

-- An item still pending in the same bucket adds -1 and +1, so only real changes remain: the
-- buckets that lost items are updated, the ones that gained items upserted.
CREATE FUNCTION items_pending_updated() RETURNS TRIGGER LANGUAGE plpgsql AS $$
BEGIN
    -- Most updates (finishes, lease renewals, reports) touch no pending item.
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

-- Pending items waiting for a retry's backoff: the few ready-looking items ahead that are
-- not ready yet.
CREATE INDEX items_backoff ON items (queue, next_attempt_at, priority, seq)
    WHERE status = 'pending' AND next_attempt_at IS NOT NULL;

-- Unfinished batches whose pending items may not be ready: paused, cancelling, or with a
-- `run_at` (finished batches have no pending items). The counters are left out of the
-- condition, so the counter updates of claims and finishes stay HOT updates.
CREATE INDEX batches_waiting ON batches (queue)
    WHERE status IN ('paused', 'cancelling') OR (run_at IS NOT NULL AND status IN ('pending', 'running'));
