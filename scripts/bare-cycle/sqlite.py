#!/usr/bin/env python3
"""The claim-and-finish cycle of batchd as bare SQL on batchd's SQLite schema, run by the
sqlite3 shell: 20,000 items, claimed and completed 100 at a time (two commits per 100) with
the statements batchd runs since range claims and event runs (migrations 000004, 000005),
WAL mode with synchronous = FULL. Usage: scripts/bare-cycle/sqlite.py (needs sqlite3)."""
import glob, os, subprocess, tempfile, time

here = os.path.dirname(os.path.abspath(__file__))
schema = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(here, "../../migrations/sqlite/*/up.sql"))))
T = "'2026-11-22 08:00:00.000000+00:00'"
setup = f"""PRAGMA journal_mode = WAL; {schema}
INSERT INTO batches(id,tenant,queue,mode,on_item_failure,status,total,pending,running,completed,failed,cancelled,needs_input,request_hash,created_at,updated_at,seq,next_index,unclaimed)
 VALUES ('b1','t','q','parallel','continue','running',20000,20000,0,0,0,0,0,'h',{T},{T},1,0,20000);
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i+1 FROM n WHERE i < 19999)
INSERT INTO items(id,batch_id,tenant,queue,priority,item_index,input,config,status,blocked,attempts,max_attempts,created_at,updated_at)
 SELECT 'i' || i,'b1','t','q',0,i,json_object('n',i),'{{}}','pending',0,0,3,{T},{T} FROM n;
"""
# Ten runs of ten events for the 100 items at the cursor, as batchd cuts them (about 1,800 bytes).
def runs(event_type, data):
    return f"""INSERT INTO event_runs (batch_id, first_seq, last_seq, events)
 SELECT 'b1', b.last_event_seq + g.v * 10 + 1, b.last_event_seq + g.v * 10 + 10,
  (SELECT json_group_array(json_object('seq', b.last_event_seq + g.v * 10 + k.v, 'item_id', 'i' || (c.first + g.v * 10 + k.v - 1),
    'item_index', c.first + g.v * 10 + k.v - 1, 'type', '{event_type}', 'step', NULL, 'message', NULL,
    'data', json('{data}'), 'at', 1764000000000000)) FROM ten AS k)
 FROM batches AS b, cur AS c, (SELECT v - 1 AS v FROM ten) AS g WHERE b.id = 'b1';
"""
cycle = f"""BEGIN IMMEDIATE;
DELETE FROM cur; INSERT INTO cur SELECT next_index FROM batches WHERE queue = 'q' AND unclaimed > 0 AND status IN ('pending', 'running') ORDER BY priority DESC, seq LIMIT 1;
SELECT count(*) FROM (SELECT id, item_index, custom_id, attempts, max_attempts, input, config, updated_at FROM items WHERE batch_id = 'b1' AND item_index >= (SELECT first FROM cur) ORDER BY item_index LIMIT 100);
INSERT INTO leases (batch_id, queue, first_index, last_index, owner, secret, running, started_at, expires_at) SELECT 'b1', 'q', first, first + 99, 'n', hex(randomblob(16)), 100, {T}, {T} FROM cur;
{runs('item.started', '{"attempt": 1, "lease_owner": "node-1"}')}
UPDATE batches SET next_index = next_index + 100, unclaimed = unclaimed - 100, pending = pending - 100, running = running + 100, last_event_seq = last_event_seq + 100, updated_at = {T} WHERE id = 'b1';
COMMIT;
BEGIN IMMEDIATE;
UPDATE items SET status = 'completed', attempts = attempts + 1, started_at = {T}, result = json_object('done', item_index), error = NULL, completed_at = {T}, updated_at = {T} WHERE id IN (SELECT 'i' || (first + k.v - 1) FROM cur, hundred AS k) AND batch_id = 'b1' AND status = 'pending' AND started_at IS NULL;
DELETE FROM leases WHERE id = (SELECT MAX(id) FROM leases);
{runs('item.completed', '{"attempt": 1}')}
UPDATE batches SET running = running - 100, completed = completed + 100, last_event_seq = last_event_seq + 100, updated_at = {T} WHERE id = 'b1';
COMMIT;
"""
helpers = """CREATE TEMP TABLE cur(first INTEGER);
CREATE TEMP TABLE ten(v INTEGER PRIMARY KEY); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 10) INSERT INTO ten SELECT i FROM n;
CREATE TEMP TABLE hundred(v INTEGER PRIMARY KEY); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 100) INSERT INTO hundred SELECT i FROM n;
"""
with tempfile.TemporaryDirectory() as d:
    db = os.path.join(d, "bare.db")
    subprocess.run(["sqlite3", db], input=setup, text=True, check=True, capture_output=True)
    run = "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;\n" + helpers + cycle * 200
    start = time.perf_counter()
    subprocess.run(["sqlite3", db], input=run, text=True, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    print(f"20000 items in {seconds:.3f} s: {20000 / seconds:.0f} items/s")
