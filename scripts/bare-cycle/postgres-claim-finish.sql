-- One claim of 100 items and their completion, as batchd writes them (crates/storage): two
-- transactions. The events of each are ten runs of ten, as batchd cuts them (about 1,800 bytes).
BEGIN;
SELECT id FROM batches WHERE queue = 'q' AND unclaimed > 0 AND status IN ('pending', 'running') ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED;
SELECT next_index AS first, last_event_seq AS ev FROM batches WHERE id = 'b1' \gset
SELECT id, item_index, custom_id, attempts, max_attempts, input, config, updated_at FROM items WHERE batch_id = 'b1' AND item_index >= :first ORDER BY item_index LIMIT 100;
INSERT INTO leases (batch_id, queue, first_index, last_index, owner, secret, running, started_at, expires_at) VALUES ('b1', 'q', :first, :first + 99, 'n', md5(random()::text), 100, now(), now() + interval '30 s') RETURNING id AS lease \gset
INSERT INTO event_runs (batch_id, first_seq, last_seq, events) SELECT 'b1', :ev + g * 10 + 1, :ev + g * 10 + 10, (SELECT json_agg(json_build_object('seq', :ev + g * 10 + k, 'item_id', 'i' || (:first + g * 10 + k - 1), 'item_index', :first + g * 10 + k - 1, 'type', 'item.started', 'step', NULL, 'message', NULL, 'data', json_build_object('attempt', 1, 'lease_owner', 'node-1'), 'at', 1764000000000000))::text FROM generate_series(1, 10) k) FROM generate_series(0, 9) g;
UPDATE batches SET next_index = next_index + 100, unclaimed = unclaimed - 100, pending = pending - 100, running = running + 100, last_event_seq = last_event_seq + 100, updated_at = now() WHERE id = 'b1';
COMMIT;
BEGIN;
SELECT last_event_seq AS ev FROM batches WHERE id = 'b1' FOR UPDATE \gset
UPDATE items AS i SET status = 'completed', attempts = i.attempts + 1, started_at = now(), result = v.result, error = NULL, completed_at = now(), updated_at = now() FROM (SELECT 'i' || g AS id, g AS item_index, jsonb_build_object('done', g) AS result FROM generate_series(:first, :first + 99) g) AS v WHERE i.id = ANY(ARRAY(SELECT 'i' || g FROM generate_series(:first, :first + 99) g)) AND i.id = v.id AND i.batch_id = 'b1' AND i.item_index = v.item_index AND i.status = 'pending' AND i.started_at IS NULL RETURNING i.seq, i.id, i.item_index, i.attempts;
DELETE FROM leases WHERE id = :lease;
INSERT INTO event_runs (batch_id, first_seq, last_seq, events) SELECT 'b1', :ev + g * 10 + 1, :ev + g * 10 + 10, (SELECT json_agg(json_build_object('seq', :ev + g * 10 + k, 'item_id', 'i' || (:first + g * 10 + k - 1), 'item_index', :first + g * 10 + k - 1, 'type', 'item.completed', 'step', NULL, 'message', NULL, 'data', json_build_object('attempt', 1), 'at', 1764000000000000))::text FROM generate_series(1, 10) k) FROM generate_series(0, 9) g;
UPDATE batches SET running = running - 100, completed = completed + 100, last_event_seq = last_event_seq + 100, updated_at = now() WHERE id = 'b1';
COMMIT;
