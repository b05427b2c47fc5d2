-- A batch's timeline is stored in runs: each row holds the events one transaction appended
-- to one batch, consecutive in `seq`, as a JSON array (a run is cut at about 2 KB, below the
-- size PostgreSQL compresses and moves out of line). A claim or a group of results of a
-- hundred items writes a few rows instead of a hundred; readers unpack the runs.
CREATE TABLE event_runs (
    batch_id TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    -- [{"seq", "item_id", "item_index", "type", "step", "message", "data", "at"}, …], `at`
    -- in microseconds since the Unix epoch.
    events TEXT NOT NULL,
    PRIMARY KEY (batch_id, last_seq),
    CONSTRAINT event_runs_seqs CHECK (first_seq >= 1 AND first_seq <= last_seq)
);
INSERT INTO event_runs (batch_id, first_seq, last_seq, events)
SELECT batch_id, seq, seq, json_build_array(json_build_object(
    'seq', seq, 'item_id', item_id, 'item_index', item_index, 'type', event_type, 'step', step,
    'message', message, 'data', data, 'at', (extract(epoch FROM at) * 1000000)::bigint
))::text
FROM events;
DROP TABLE events;
