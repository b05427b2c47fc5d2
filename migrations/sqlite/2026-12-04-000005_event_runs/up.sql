-- A batch's timeline is stored in runs: each row holds the events one transaction appended
-- to one batch, consecutive in `seq`, as a JSON array (a run is cut at about 2 KB). A claim
-- or a group of results of a hundred items writes a few rows instead of a hundred; readers
-- unpack the runs.
CREATE TABLE event_runs (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    -- [{"seq", "item_id", "item_index", "type", "step", "message", "data", "at"}, …], `at`
    -- in microseconds since the Unix epoch (as the time's text in rows moved from `events`).
    events TEXT NOT NULL,
    PRIMARY KEY (batch_id, last_seq),
    CONSTRAINT event_runs_seqs CHECK (first_seq >= 1 AND first_seq <= last_seq)
) WITHOUT ROWID;
INSERT INTO event_runs (batch_id, first_seq, last_seq, events)
SELECT batch_id, seq, seq, json_array(json_object(
    'seq', seq, 'item_id', item_id, 'item_index', item_index, 'type', event_type, 'step', step,
    'message', message, 'data', json(data), 'at', at
))
FROM events;
DROP TABLE events;
