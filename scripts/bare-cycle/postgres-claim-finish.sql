BEGIN;
WITH c AS (SELECT seq FROM items WHERE queue = 'q' AND status = 'pending' AND NOT blocked ORDER BY priority DESC, seq LIMIT 100 FOR UPDATE SKIP LOCKED),
u AS (UPDATE items i SET status = 'running', attempts = attempts + 1, lease_owner = 'n', lease_token = md5(i.seq::text), lease_expires_at = now() + interval '30 s', started_at = now(), updated_at = now() FROM c WHERE i.seq = c.seq RETURNING i.id, i.item_index)
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, data, at) SELECT 'b1', nextval('evseq'), id, item_index, 'item.started', '{"attempt": 1}', now() FROM u;
UPDATE batches SET pending = pending - 100, running = running + 100, updated_at = now() WHERE id = 'b1';
COMMIT;
BEGIN;
WITH c AS (SELECT seq FROM items WHERE status = 'running' ORDER BY lease_expires_at LIMIT 100 FOR UPDATE),
u AS (UPDATE items i SET status = 'completed', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, result = '{"ok": true}', completed_at = now(), updated_at = now() FROM c WHERE i.seq = c.seq RETURNING i.id, i.item_index)
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, data, at) SELECT 'b1', nextval('evseq'), id, item_index, 'item.completed', '{"attempt": 1}', now() FROM u;
UPDATE batches SET running = running - 100, completed = completed + 100, updated_at = now() WHERE id = 'b1';
COMMIT;
