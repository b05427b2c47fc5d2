DROP INDEX batches_pending;
CREATE INDEX batches_pending ON batches (queue, priority DESC, seq) WHERE pending > 0;
DROP INDEX batches_claimable;
CREATE INDEX batches_claimable ON batches (queue, priority DESC, seq)
    WHERE unclaimed > 0 AND status IN ('pending', 'running');
