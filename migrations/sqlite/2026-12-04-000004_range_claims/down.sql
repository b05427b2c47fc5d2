-- Items running under a range lease become plain pending items again (claimed anew: batchd
-- runs each item at least once).
DROP TABLE leases;
DROP TABLE queue_entries;
DROP INDEX batches_pending;
DROP INDEX batches_claimable;
ALTER TABLE batches DROP COLUMN unclaimed;
ALTER TABLE batches DROP COLUMN next_index;
DROP INDEX batches_seq;
ALTER TABLE batches DROP COLUMN seq;
CREATE INDEX items_claimable ON items (queue, priority DESC, seq) WHERE status = 'pending' AND blocked = 0;
CREATE INDEX items_pending ON items (queue, priority DESC, seq) WHERE status = 'pending';
CREATE INDEX items_running_leases ON items (lease_expires_at) WHERE status = 'running';
CREATE INDEX items_backoff ON items (queue, next_attempt_at, priority)
    WHERE status = 'pending' AND next_attempt_at IS NOT NULL;

DELETE FROM queue_position_buckets;
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
