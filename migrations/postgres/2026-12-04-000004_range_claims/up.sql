-- Range claims: an item is written when it is submitted and when it ends, not when it starts.
--
-- A parallel batch keeps a claim cursor, `next_index`. A claim takes the next pending items
-- at or after the cursor, moves the cursor past them and records one lease row for the
-- whole range; the item rows are not written. An item whose row says `pending`, that never
-- started (`started_at IS NULL`) and whose index is below its batch's cursor is therefore
-- running under the range lease that covers it. Items that must be claimed one by one
-- (retried, handed back, answered, and every item of a sequential batch) wait in
-- `queue_entries`; an item claimed one by one is `running` in its own row and has a lease
-- row of its own (`item_seq`). Every running item has exactly one lease row, which is
-- where expired leases are found.
--
-- No index of `items` names a column that changes after insert, so PostgreSQL writes an
-- item's end in place (a HOT update, no index touched) when its page has room for the new
-- version: half of each page is left free for that, since a group of results rewrites many
-- rows of one page at once.

DROP TRIGGER items_pending_insert ON items;
DROP TRIGGER items_pending_update ON items;
DROP TRIGGER items_pending_delete ON items;
DROP FUNCTION items_pending_inserted();
DROP FUNCTION items_pending_updated();
DROP FUNCTION items_pending_deleted();
DROP INDEX items_claimable;
DROP INDEX items_pending;
DROP INDEX items_running_leases;
DROP INDEX items_backoff;
ALTER TABLE items SET (fillfactor = 50);

-- Submission order of batches: claim order within a queue and priority is (batch seq,
-- item index). Existing batches keep the order their items were claimed in before.
ALTER TABLE batches ADD COLUMN seq BIGINT;
UPDATE batches AS b SET seq = o.n FROM (
    SELECT id, row_number() OVER (
        ORDER BY (SELECT MIN(i.seq) FROM items AS i WHERE i.batch_id = batches.id), created_at, id
    ) AS n FROM batches
) AS o WHERE b.id = o.id;
CREATE SEQUENCE batches_seq_seq OWNED BY batches.seq;
SELECT setval('batches_seq_seq', COALESCE((SELECT MAX(seq) FROM batches), 0) + 1, false);
ALTER TABLE batches ALTER COLUMN seq SET DEFAULT nextval('batches_seq_seq'), ALTER COLUMN seq SET NOT NULL;
CREATE UNIQUE INDEX batches_seq ON batches (seq);

-- The claim cursor of a parallel batch, and how many pending items wait at or after it.
ALTER TABLE batches ADD COLUMN next_index INTEGER NOT NULL DEFAULT 0 CHECK (next_index >= 0);
ALTER TABLE batches ADD COLUMN unclaimed BIGINT NOT NULL DEFAULT 0 CHECK (unclaimed >= 0);
-- No range lease exists yet, so the cursor starts at the first pending item that never ran.
UPDATE batches AS b SET
    next_index = COALESCE((SELECT MIN(i.item_index) FROM items AS i
        WHERE i.batch_id = b.id AND i.status = 'pending' AND i.started_at IS NULL), b.total),
    unclaimed = (SELECT COUNT(*) FROM items AS i
        WHERE i.batch_id = b.id AND i.status = 'pending' AND i.started_at IS NULL)
WHERE b.mode = 'parallel';
ALTER TABLE batches ADD CONSTRAINT batches_unclaimed_pending CHECK (unclaimed <= pending);
CREATE INDEX batches_claimable ON batches (queue, priority DESC, seq)
    WHERE unclaimed > 0 AND status IN ('pending', 'running');
CREATE INDEX batches_pending ON batches (queue, priority DESC, seq) WHERE pending > 0;

CREATE TABLE queue_entries (
    item_seq BIGINT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    batch_seq BIGINT NOT NULL,
    item_index INTEGER NOT NULL,
    -- A later item of a sequential batch, waiting for the items before it to end.
    blocked BOOLEAN NOT NULL DEFAULT FALSE,
    -- A retry waiting for its backoff.
    not_before TIMESTAMPTZ
);
CREATE INDEX queue_entries_claim ON queue_entries (queue, priority DESC, batch_seq, item_index) WHERE NOT blocked;
CREATE INDEX queue_entries_batch ON queue_entries (batch_id, item_index);
CREATE INDEX queue_entries_backoff ON queue_entries (queue, not_before) WHERE not_before IS NOT NULL;
INSERT INTO queue_entries (item_seq, batch_id, queue, priority, batch_seq, item_index, blocked, not_before)
SELECT i.seq, i.batch_id, i.queue, i.priority, b.seq, i.item_index, i.blocked, i.next_attempt_at
FROM items AS i JOIN batches AS b ON b.id = i.batch_id
WHERE i.status = 'pending' AND (b.mode = 'sequential' OR i.started_at IS NOT NULL);

CREATE TABLE leases (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    first_index INTEGER NOT NULL,
    last_index INTEGER NOT NULL,
    -- The one item of a lease taken one by one; NULL for a range.
    item_seq BIGINT,
    owner TEXT NOT NULL,
    secret TEXT NOT NULL,
    -- Items still running under it; the row goes when the last one ends.
    running INTEGER NOT NULL CHECK (running >= 0),
    started_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    CONSTRAINT leases_range CHECK (first_index <= last_index),
    CONSTRAINT leases_single CHECK (item_seq IS NULL OR (first_index = last_index AND running = 1))
);
CREATE INDEX leases_expires ON leases (expires_at);
CREATE INDEX leases_batch ON leases (batch_id, first_index);
CREATE UNIQUE INDEX leases_item ON leases (item_seq) WHERE item_seq IS NOT NULL;
INSERT INTO leases (batch_id, queue, first_index, last_index, item_seq, owner, secret, running, started_at, expires_at)
SELECT batch_id, queue, item_index, item_index, seq, COALESCE(lease_owner, ''), lease_token, 1,
    COALESCE(started_at, updated_at), lease_expires_at
FROM items WHERE status = 'running';

-- Queue positions: the pending items of each queue and priority, per bucket of 1,024 batch
-- `seq` values (a batch's items are all in its bucket). The store keeps the counts from
-- each batch's `pending` counter as it saves the batch; POSITION_BUCKET in
-- crates/storage/src/common.rs must be the same 1024.
DELETE FROM queue_position_buckets;
INSERT INTO queue_position_buckets (queue, priority, bucket, pending)
SELECT queue, priority, seq / 1024, SUM(pending) FROM batches WHERE pending > 0 GROUP BY 1, 2, 3;
