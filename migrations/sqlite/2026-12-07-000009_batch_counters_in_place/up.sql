-- A batch's counters change on every claim and every group of results (`pending`,
-- `unclaimed`, …). Two partial indexes named counters in their predicates, so SQLite
-- rewrote both indexes' entries (and their pages in the WAL) on each such change. With
-- predicates on `status` alone, which changes a few times in a batch's life, a counter
-- update leaves every index of `batches` as it was. The queries that use these indexes
-- name the same `status` terms and filter the counters themselves.
DROP INDEX batches_claimable;
CREATE INDEX batches_claimable ON batches (queue, priority DESC, seq)
    WHERE status IN ('pending', 'running');
DROP INDEX batches_pending;
CREATE INDEX batches_pending ON batches (queue, priority DESC, seq)
    WHERE status IN ('pending', 'running', 'paused', 'cancelling');
