-- Times back to diesel's text, `YYYY-MM-DD HH:MM:SS[.fraction]+00:00` in UTC, the fraction
-- without trailing zeros, as the store wrote them before. Each distinct time is converted
-- once, in `time_micros`.

CREATE TEMP TABLE time_micros (micros INTEGER NOT NULL PRIMARY KEY, text TEXT);
INSERT INTO time_micros (micros)
SELECT run_at FROM batches WHERE typeof(run_at) = 'integer'
UNION SELECT created_at FROM batches WHERE typeof(created_at) = 'integer'
UNION SELECT started_at FROM batches WHERE typeof(started_at) = 'integer'
UNION SELECT updated_at FROM batches WHERE typeof(updated_at) = 'integer'
UNION SELECT completed_at FROM batches WHERE typeof(completed_at) = 'integer'
UNION SELECT next_attempt_at FROM items WHERE typeof(next_attempt_at) = 'integer'
UNION SELECT lease_expires_at FROM items WHERE typeof(lease_expires_at) = 'integer'
UNION SELECT created_at FROM items WHERE typeof(created_at) = 'integer'
UNION SELECT started_at FROM items WHERE typeof(started_at) = 'integer'
UNION SELECT updated_at FROM items WHERE typeof(updated_at) = 'integer'
UNION SELECT completed_at FROM items WHERE typeof(completed_at) = 'integer'
UNION SELECT started_at FROM leases WHERE typeof(started_at) = 'integer'
UNION SELECT expires_at FROM leases WHERE typeof(expires_at) = 'integer'
UNION SELECT not_before FROM queue_entries WHERE typeof(not_before) = 'integer'
UNION SELECT updated_at FROM queue_states WHERE typeof(updated_at) = 'integer'
UNION SELECT at FROM webhook_attempts WHERE typeof(at) = 'integer'
UNION SELECT next_attempt_at FROM webhook_deliveries WHERE typeof(next_attempt_at) = 'integer'
UNION SELECT lease_expires_at FROM webhook_deliveries WHERE typeof(lease_expires_at) = 'integer'
UNION SELECT created_at FROM webhook_deliveries WHERE typeof(created_at) = 'integer'
UNION SELECT updated_at FROM webhook_deliveries WHERE typeof(updated_at) = 'integer';
UPDATE time_micros SET text =
    strftime('%Y-%m-%d %H:%M:%S', (micros - ((micros % 1000000) + 1000000) % 1000000) / 1000000, 'unixepoch')
    || CASE WHEN ((micros % 1000000) + 1000000) % 1000000 = 0 THEN ''
        ELSE '.' || rtrim(printf('%06d', ((micros % 1000000) + 1000000) % 1000000), '0') END
    || '+00:00';

UPDATE batches SET
    run_at = CASE WHEN typeof(run_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = run_at) ELSE run_at END,
    created_at = CASE WHEN typeof(created_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = created_at) ELSE created_at END,
    started_at = CASE WHEN typeof(started_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = started_at) ELSE started_at END,
    updated_at = CASE WHEN typeof(updated_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = updated_at) ELSE updated_at END,
    completed_at = CASE WHEN typeof(completed_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = completed_at) ELSE completed_at END;

UPDATE items SET
    next_attempt_at = CASE WHEN typeof(next_attempt_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = next_attempt_at) ELSE next_attempt_at END,
    lease_expires_at = CASE WHEN typeof(lease_expires_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = lease_expires_at) ELSE lease_expires_at END,
    created_at = CASE WHEN typeof(created_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = created_at) ELSE created_at END,
    started_at = CASE WHEN typeof(started_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = started_at) ELSE started_at END,
    updated_at = CASE WHEN typeof(updated_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = updated_at) ELSE updated_at END,
    completed_at = CASE WHEN typeof(completed_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = completed_at) ELSE completed_at END;

UPDATE leases SET
    started_at = CASE WHEN typeof(started_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = started_at) ELSE started_at END,
    expires_at = CASE WHEN typeof(expires_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = expires_at) ELSE expires_at END;

UPDATE queue_entries SET
    not_before = CASE WHEN typeof(not_before) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = not_before) ELSE not_before END;

UPDATE queue_states SET
    updated_at = CASE WHEN typeof(updated_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = updated_at) ELSE updated_at END;

UPDATE webhook_attempts SET
    at = CASE WHEN typeof(at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = at) ELSE at END;

UPDATE webhook_deliveries SET
    next_attempt_at = CASE WHEN typeof(next_attempt_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = next_attempt_at) ELSE next_attempt_at END,
    lease_expires_at = CASE WHEN typeof(lease_expires_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = lease_expires_at) ELSE lease_expires_at END,
    created_at = CASE WHEN typeof(created_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = created_at) ELSE created_at END,
    updated_at = CASE WHEN typeof(updated_at) = 'integer' THEN (SELECT text FROM time_micros WHERE micros = updated_at) ELSE updated_at END;

DROP TABLE time_micros;
