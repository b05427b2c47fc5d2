-- Times as integers: every time column holds whole microseconds since 1970-01-01 00:00:00
-- UTC instead of diesel's text, `2026-12-06 19:39:57.403801+00:00`. The text took 32 bytes
-- of each row (an item's row has four times) and of each index entry over a time; an integer
-- takes 8 at most. The columns keep their declared type, `TIMESTAMP`, whose affinity stores
-- an integer as one, so no table is rebuilt.
--
-- The store wrote every time in UTC, `YYYY-MM-DD HH:MM:SS[.fraction]+00:00`, its fraction 1 to
-- 9 digits (the store's clock gives whole microseconds; digits past the sixth are dropped).
-- Each distinct text is converted once, in `time_texts`. A text that does not parse becomes
-- NULL, which a NOT NULL column refuses: the migration then fails rather than keep a time it
-- cannot read.

CREATE TEMP TABLE time_texts (text TEXT NOT NULL PRIMARY KEY, micros INTEGER) WITHOUT ROWID;
INSERT INTO time_texts (text)
SELECT run_at FROM batches WHERE typeof(run_at) = 'text'
UNION SELECT created_at FROM batches WHERE typeof(created_at) = 'text'
UNION SELECT started_at FROM batches WHERE typeof(started_at) = 'text'
UNION SELECT updated_at FROM batches WHERE typeof(updated_at) = 'text'
UNION SELECT completed_at FROM batches WHERE typeof(completed_at) = 'text'
UNION SELECT next_attempt_at FROM items WHERE typeof(next_attempt_at) = 'text'
UNION SELECT lease_expires_at FROM items WHERE typeof(lease_expires_at) = 'text'
UNION SELECT created_at FROM items WHERE typeof(created_at) = 'text'
UNION SELECT started_at FROM items WHERE typeof(started_at) = 'text'
UNION SELECT updated_at FROM items WHERE typeof(updated_at) = 'text'
UNION SELECT completed_at FROM items WHERE typeof(completed_at) = 'text'
UNION SELECT started_at FROM leases WHERE typeof(started_at) = 'text'
UNION SELECT expires_at FROM leases WHERE typeof(expires_at) = 'text'
UNION SELECT not_before FROM queue_entries WHERE typeof(not_before) = 'text'
UNION SELECT updated_at FROM queue_states WHERE typeof(updated_at) = 'text'
UNION SELECT at FROM webhook_attempts WHERE typeof(at) = 'text'
UNION SELECT next_attempt_at FROM webhook_deliveries WHERE typeof(next_attempt_at) = 'text'
UNION SELECT lease_expires_at FROM webhook_deliveries WHERE typeof(lease_expires_at) = 'text'
UNION SELECT created_at FROM webhook_deliveries WHERE typeof(created_at) = 'text'
UNION SELECT updated_at FROM webhook_deliveries WHERE typeof(updated_at) = 'text';
UPDATE time_texts SET micros = unixepoch(substr(text, 1, 19)) * 1000000
    + CASE WHEN substr(text, 20, 1) = '.'
        THEN CAST(substr(substr(text, 21, instr(text, '+') - 21) || '000000', 1, 6) AS INTEGER)
        ELSE 0 END;

UPDATE batches SET
    run_at = CASE WHEN typeof(run_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = run_at) ELSE run_at END,
    created_at = CASE WHEN typeof(created_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = created_at) ELSE created_at END,
    started_at = CASE WHEN typeof(started_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = started_at) ELSE started_at END,
    updated_at = CASE WHEN typeof(updated_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = updated_at) ELSE updated_at END,
    completed_at = CASE WHEN typeof(completed_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = completed_at) ELSE completed_at END;

UPDATE items SET
    next_attempt_at = CASE WHEN typeof(next_attempt_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = next_attempt_at) ELSE next_attempt_at END,
    lease_expires_at = CASE WHEN typeof(lease_expires_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = lease_expires_at) ELSE lease_expires_at END,
    created_at = CASE WHEN typeof(created_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = created_at) ELSE created_at END,
    started_at = CASE WHEN typeof(started_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = started_at) ELSE started_at END,
    updated_at = CASE WHEN typeof(updated_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = updated_at) ELSE updated_at END,
    completed_at = CASE WHEN typeof(completed_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = completed_at) ELSE completed_at END;

UPDATE leases SET
    started_at = CASE WHEN typeof(started_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = started_at) ELSE started_at END,
    expires_at = CASE WHEN typeof(expires_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = expires_at) ELSE expires_at END;

UPDATE queue_entries SET
    not_before = CASE WHEN typeof(not_before) = 'text' THEN (SELECT micros FROM time_texts WHERE text = not_before) ELSE not_before END;

UPDATE queue_states SET
    updated_at = CASE WHEN typeof(updated_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = updated_at) ELSE updated_at END;

UPDATE webhook_attempts SET
    at = CASE WHEN typeof(at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = at) ELSE at END;

UPDATE webhook_deliveries SET
    next_attempt_at = CASE WHEN typeof(next_attempt_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = next_attempt_at) ELSE next_attempt_at END,
    lease_expires_at = CASE WHEN typeof(lease_expires_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = lease_expires_at) ELSE lease_expires_at END,
    created_at = CASE WHEN typeof(created_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = created_at) ELSE created_at END,
    updated_at = CASE WHEN typeof(updated_at) = 'text' THEN (SELECT micros FROM time_texts WHERE text = updated_at) ELSE updated_at END;

DROP TABLE time_texts;
