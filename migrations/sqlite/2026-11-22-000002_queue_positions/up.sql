-- Queue positions without counting the queue (DESIGN.md section 3). The pending items
-- (blocked ones included) of each queue and priority are counted per bucket of 1,024 `seq`
-- values, so the pending items ahead of an item are a sum over a few buckets plus a count
-- of at most 1,023 index entries in its own bucket. POSITION_BUCKET in
-- crates/storage/src/common.rs must be the same 1024.
-- Triggers keep the counts, so no code path can forget them. A bucket whose count reaches
-- zero is deleted.

CREATE TABLE queue_position_buckets (
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    bucket BIGINT NOT NULL,
    pending BIGINT NOT NULL CHECK (pending >= 0),
    PRIMARY KEY (queue, priority, bucket)
);

INSERT INTO queue_position_buckets (queue, priority, bucket, pending)
SELECT queue, priority, seq / 1024, COUNT(*) FROM items WHERE status = 'pending' GROUP BY 1, 2, 3;

CREATE TRIGGER items_pending_insert AFTER INSERT ON items
WHEN NEW.status = 'pending'
BEGIN
    INSERT INTO queue_position_buckets (queue, priority, bucket, pending)
    VALUES (NEW.queue, NEW.priority, NEW.seq / 1024, 1)
    ON CONFLICT (queue, priority, bucket) DO UPDATE SET pending = pending + 1;
END;

CREATE TRIGGER items_pending_enter AFTER UPDATE OF status, queue, priority ON items
WHEN NEW.status = 'pending'
    AND (OLD.status <> 'pending' OR OLD.queue <> NEW.queue OR OLD.priority <> NEW.priority)
BEGIN
    INSERT INTO queue_position_buckets (queue, priority, bucket, pending)
    VALUES (NEW.queue, NEW.priority, NEW.seq / 1024, 1)
    ON CONFLICT (queue, priority, bucket) DO UPDATE SET pending = pending + 1;
END;

CREATE TRIGGER items_pending_leave AFTER UPDATE OF status, queue, priority ON items
WHEN OLD.status = 'pending'
    AND (NEW.status <> 'pending' OR OLD.queue <> NEW.queue OR OLD.priority <> NEW.priority)
BEGIN
    DELETE FROM queue_position_buckets
    WHERE queue = OLD.queue AND priority = OLD.priority AND bucket = OLD.seq / 1024 AND pending = 1;
    UPDATE queue_position_buckets SET pending = pending - 1
    WHERE queue = OLD.queue AND priority = OLD.priority AND bucket = OLD.seq / 1024;
END;

CREATE TRIGGER items_pending_delete AFTER DELETE ON items
WHEN OLD.status = 'pending'
BEGIN
    DELETE FROM queue_position_buckets
    WHERE queue = OLD.queue AND priority = OLD.priority AND bucket = OLD.seq / 1024 AND pending = 1;
    UPDATE queue_position_buckets SET pending = pending - 1
    WHERE queue = OLD.queue AND priority = OLD.priority AND bucket = OLD.seq / 1024;
END;

-- Pending items waiting for a retry's backoff: the few ready-looking items ahead that are
-- not ready yet.
CREATE INDEX items_backoff ON items (queue, next_attempt_at, priority)
    WHERE status = 'pending' AND next_attempt_at IS NOT NULL;

-- Unfinished batches whose pending items may not be ready: paused, cancelling, or with a
-- `run_at` (finished batches have no pending items). The counters are left out of the
-- condition, so the counter updates of claims and finishes never touch this index.
CREATE INDEX batches_waiting ON batches (queue)
    WHERE status IN ('paused', 'cancelling') OR (run_at IS NOT NULL AND status IN ('pending', 'running'));
