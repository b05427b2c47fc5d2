-- A batch's counters change on every claim and every group of results (`pending`,
-- `unclaimed`, `next_index`, `running`, …). Two partial indexes named counters in their
-- predicates, so each such change was a new row version with a new entry in every one of
-- the table's nine indexes. With predicates on `status` alone, which changes a few times in
-- a batch's life, a counter update names no indexed column and PostgreSQL writes it on the
-- same page (a HOT update), given room there: hence the fill factor.
-- `range_candidates` and the position query filter the counters themselves.
DROP INDEX batches_claimable;
CREATE INDEX batches_claimable ON batches (queue, priority DESC, seq)
    WHERE status IN ('pending', 'running');
DROP INDEX batches_pending;
CREATE INDEX batches_pending ON batches (queue, priority DESC, seq)
    WHERE status IN ('pending', 'running', 'paused', 'cancelling');
ALTER TABLE batches SET (fillfactor = 50);
