-- batchd schema, PostgreSQL. The invariants of DESIGN.md section 2 are CHECK constraints
-- too, so no code path can break them.

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    queue TEXT NOT NULL,
    session_id TEXT,
    mode TEXT NOT NULL CHECK (mode IN ('parallel', 'sequential')),
    on_item_failure TEXT NOT NULL CHECK (on_item_failure IN ('continue', 'fail_batch')),
    priority INTEGER NOT NULL DEFAULT 0,
    run_at TIMESTAMPTZ,
    config JSONB NOT NULL DEFAULT '{}',
    webhook_url TEXT,
    webhook_secret TEXT,
    webhook_events JSONB,
    metadata JSONB,
    result JSONB,
    status TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'paused', 'cancelling', 'completed', 'failed', 'cancelled')),
    total BIGINT NOT NULL CHECK (total >= 0),
    pending BIGINT NOT NULL CHECK (pending >= 0),
    running BIGINT NOT NULL CHECK (running >= 0),
    completed BIGINT NOT NULL CHECK (completed >= 0),
    failed BIGINT NOT NULL CHECK (failed >= 0),
    cancelled BIGINT NOT NULL CHECK (cancelled >= 0),
    needs_input BIGINT NOT NULL CHECK (needs_input >= 0),
    message TEXT,
    error TEXT,
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    last_event_seq BIGINT NOT NULL DEFAULT 0 CHECK (last_event_seq >= 0),
    created_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL,
    completed_at TIMESTAMPTZ,
    CONSTRAINT batches_counts_sum CHECK (pending + running + completed + failed + cancelled + needs_input = total),
    CONSTRAINT batches_finished_has_completed_at
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (completed_at IS NOT NULL))
);
CREATE UNIQUE INDEX batches_idempotency_key ON batches (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX batches_tenant_created ON batches (tenant, created_at DESC, id DESC);
CREATE INDEX batches_created ON batches (created_at DESC, id DESC);
CREATE INDEX batches_completed_at ON batches (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE items (
    -- Claim order within a priority: submission order, then index (items are inserted in index order).
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    item_index INTEGER NOT NULL CHECK (item_index >= 0),
    custom_id TEXT,
    input JSONB NOT NULL,
    config JSONB NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'needs_input', 'completed', 'failed', 'cancelled')),
    -- A later item of a sequential batch: pending, but not claimable until the items before it end.
    blocked BOOLEAN NOT NULL DEFAULT FALSE,
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
    next_attempt_at TIMESTAMPTZ,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at TIMESTAMPTZ,
    step TEXT,
    message TEXT,
    progress_current BIGINT,
    progress_total BIGINT,
    result JSONB,
    error TEXT,
    question JSONB,
    answer JSONB,
    cancel_reason TEXT CHECK (cancel_reason IN ('item', 'batch', 'fail_batch')),
    created_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL,
    completed_at TIMESTAMPTZ,
    CONSTRAINT items_index_unique UNIQUE (batch_id, item_index),
    CONSTRAINT items_finished_has_completed_at
        CHECK ((status IN ('completed', 'failed', 'cancelled')) = (completed_at IS NOT NULL)),
    CONSTRAINT items_lease_only_while_running
        CHECK ((status = 'running') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE UNIQUE INDEX items_custom_id ON items (batch_id, custom_id) WHERE custom_id IS NOT NULL;
CREATE INDEX items_claimable ON items (queue, priority DESC, seq) WHERE status = 'pending' AND NOT blocked;
-- Queue positions count the blocked later items of sequential batches too.
CREATE INDEX items_pending ON items (queue, priority DESC, seq) WHERE status = 'pending';
CREATE INDEX items_running_leases ON items (lease_expires_at) WHERE status = 'running';
CREATE INDEX items_batch_status ON items (batch_id, status);
CREATE INDEX items_tenant_created ON items (tenant, created_at, seq);

CREATE TABLE events (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL CHECK (seq >= 1),
    item_id TEXT,
    item_index INTEGER,
    event_type TEXT NOT NULL,
    step TEXT,
    message TEXT,
    data JSONB,
    at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (batch_id, seq)
);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    event_seq BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    item_id TEXT,
    url TEXT NOT NULL,
    -- The exact body sent on every attempt.
    payload TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at TIMESTAMPTZ,
    lease_token TEXT,
    lease_expires_at TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_id, created_at, id);

CREATE TABLE webhook_attempts (
    delivery_id TEXT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL CHECK (attempt >= 1),
    at TIMESTAMPTZ NOT NULL,
    status_code INTEGER,
    latency_ms BIGINT NOT NULL,
    error TEXT,
    response_body TEXT,
    PRIMARY KEY (delivery_id, attempt)
);

CREATE TABLE queue_states (
    name TEXT PRIMARY KEY,
    paused BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at TIMESTAMPTZ NOT NULL
);
