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
-- No index of `items` names `status` any more, so an item's end touches no index.

DROP TRIGGER items_pending_insert;
DROP TRIGGER items_pending_enter;
DROP TRIGGER items_pending_leave;
DROP TRIGGER items_pending_delete;
DROP INDEX items_claimable;
DROP INDEX items_pending;
DROP INDEX items_running_leases;
DROP INDEX items_backoff;

-- The same items table with its CHECK constraints spelled without IN lists: SQLite checks
-- `x IN (a, b, c)` by building a temporary index of the list, for every row it writes, which
-- cost more than writing the row. Comparisons joined by OR say the same. (No table refers
-- to items, so it can be rebuilt in place.)
CREATE TABLE items_rebuilt (
    -- Claim order within a priority: submission order, then index (items are inserted in index order).
    seq INTEGER NOT NULL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    item_index INTEGER NOT NULL CHECK (item_index >= 0),
    custom_id TEXT,
    input TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (
        status = 'pending' OR status = 'running' OR status = 'needs_input'
        OR status = 'completed' OR status = 'failed' OR status = 'cancelled'
    ),
    -- A later item of a sequential batch: pending, but not claimable until the items before it end.
    blocked BOOLEAN NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
    next_attempt_at TIMESTAMP,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at TIMESTAMP,
    step TEXT,
    message TEXT,
    progress_current BIGINT,
    progress_total BIGINT,
    result TEXT,
    error TEXT,
    question TEXT,
    answer TEXT,
    cancel_reason TEXT CHECK (cancel_reason = 'item' OR cancel_reason = 'batch' OR cancel_reason = 'fail_batch'),
    created_at TIMESTAMP NOT NULL,
    started_at TIMESTAMP,
    updated_at TIMESTAMP NOT NULL,
    completed_at TIMESTAMP,
    CONSTRAINT items_index_unique UNIQUE (batch_id, item_index),
    CONSTRAINT items_finished_has_completed_at
        CHECK ((status = 'completed' OR status = 'failed' OR status = 'cancelled') = (completed_at IS NOT NULL)),
    CONSTRAINT items_lease_only_while_running
        CHECK ((status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL))
);
INSERT INTO items_rebuilt SELECT * FROM items;
DROP TABLE items;
ALTER TABLE items_rebuilt RENAME TO items;
CREATE UNIQUE INDEX items_custom_id ON items (batch_id, custom_id) WHERE custom_id IS NOT NULL;
CREATE INDEX items_tenant_created ON items (tenant, created_at, seq);

-- Submission order of batches: claim order within a queue and priority is (batch seq,
-- item index). Existing batches keep the order their items were claimed in before. The
-- store gives each new batch MAX(seq) + 1 inside its write transaction.
ALTER TABLE batches ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
UPDATE batches SET seq = (
    SELECT o.n FROM (
        SELECT id, row_number() OVER (
            ORDER BY (SELECT MIN(i.seq) FROM items AS i WHERE i.batch_id = b.id), created_at, id
        ) AS n FROM batches AS b
    ) AS o WHERE o.id = batches.id
);
CREATE UNIQUE INDEX batches_seq ON batches (seq);

-- The claim cursor of a parallel batch, and how many pending items wait at or after it.
ALTER TABLE batches ADD COLUMN next_index INTEGER NOT NULL DEFAULT 0 CHECK (next_index >= 0);
ALTER TABLE batches ADD COLUMN unclaimed BIGINT NOT NULL DEFAULT 0 CHECK (unclaimed >= 0);
-- No range lease exists yet, so the cursor starts at the first pending item that never ran.
UPDATE batches SET
    next_index = COALESCE((SELECT MIN(i.item_index) FROM items AS i
        WHERE i.batch_id = batches.id AND i.status = 'pending' AND i.started_at IS NULL), total),
    unclaimed = (SELECT COUNT(*) FROM items AS i
        WHERE i.batch_id = batches.id AND i.status = 'pending' AND i.started_at IS NULL)
WHERE mode = 'parallel';
CREATE INDEX batches_claimable ON batches (queue, priority DESC, seq)
    WHERE unclaimed > 0 AND status IN ('pending', 'running');
CREATE INDEX batches_pending ON batches (queue, priority DESC, seq) WHERE pending > 0;

CREATE TABLE queue_entries (
    item_seq INTEGER NOT NULL PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    batch_seq BIGINT NOT NULL,
    item_index INTEGER NOT NULL,
    -- A later item of a sequential batch, waiting for the items before it to end.
    blocked BOOLEAN NOT NULL DEFAULT 0,
    -- A retry waiting for its backoff.
    not_before TIMESTAMP
);
CREATE INDEX queue_entries_claim ON queue_entries (queue, priority DESC, batch_seq, item_index) WHERE blocked = 0;
CREATE INDEX queue_entries_batch ON queue_entries (batch_id, item_index);
CREATE INDEX queue_entries_backoff ON queue_entries (queue, not_before) WHERE not_before IS NOT NULL;
INSERT INTO queue_entries (item_seq, batch_id, queue, priority, batch_seq, item_index, blocked, not_before)
SELECT i.seq, i.batch_id, i.queue, i.priority, b.seq, i.item_index, i.blocked, i.next_attempt_at
FROM items AS i JOIN batches AS b ON b.id = i.batch_id
WHERE i.status = 'pending' AND (b.mode = 'sequential' OR i.started_at IS NOT NULL);

CREATE TABLE leases (
    id INTEGER NOT NULL PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    queue TEXT NOT NULL,
    first_index INTEGER NOT NULL,
    last_index INTEGER NOT NULL,
    -- The one item of a lease taken one by one; NULL for a range.
    item_seq BIGINT,
    owner TEXT NOT NULL,
    secret TEXT NOT NULL,
    -- Items still running under it; the row goes when the last one ends.
    running INTEGER NOT NULL CHECK (running >= 0),
    started_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
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
