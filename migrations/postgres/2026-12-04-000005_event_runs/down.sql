CREATE TABLE events (
    batch_id TEXT NOT NULL,
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
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, step, message, data, at)
SELECT r.batch_id, (e->>'seq')::bigint, e->>'item_id', (e->>'item_index')::int, e->>'type', e->>'step',
    e->>'message', NULLIF(e->'data', 'null'::jsonb), to_timestamp((e->>'at')::numeric / 1000000)
FROM event_runs AS r, jsonb_array_elements(r.events::jsonb) AS e;
DROP TABLE event_runs;
