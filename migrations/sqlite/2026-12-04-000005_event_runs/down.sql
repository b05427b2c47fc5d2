CREATE TABLE events (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL CHECK (seq >= 1),
    item_id TEXT,
    item_index INTEGER,
    event_type TEXT NOT NULL,
    step TEXT,
    message TEXT,
    data TEXT,
    at TIMESTAMP NOT NULL,
    PRIMARY KEY (batch_id, seq)
);
-- Times written as microseconds come back in the text form the store writes.
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, step, message, data, at)
SELECT r.batch_id, json_extract(e.value, '$.seq'), json_extract(e.value, '$.item_id'),
    json_extract(e.value, '$.item_index'), json_extract(e.value, '$.type'), json_extract(e.value, '$.step'),
    json_extract(e.value, '$.message'), json(json_extract(e.value, '$.data')),
    CASE WHEN json_type(e.value, '$.at') = 'integer'
        THEN strftime('%Y-%m-%d %H:%M:%f+00:00', json_extract(e.value, '$.at') / 1000000.0, 'unixepoch')
        ELSE json_extract(e.value, '$.at') END
FROM event_runs AS r, json_each(r.events) AS e;
DROP TABLE event_runs;
