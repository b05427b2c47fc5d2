#!/usr/bin/env python3
"""The claim-and-finish cycle of batchd as bare SQL on batchd's SQLite schema, run by the
sqlite3 shell: 20,000 items, claimed and completed 100 at a time (two commits per 100),
WAL mode with synchronous = FULL. Usage: scripts/bare-cycle/sqlite.py (needs sqlite3)."""
import glob, os, subprocess, tempfile, time

here = os.path.dirname(os.path.abspath(__file__))
schema = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(here, "../../migrations/sqlite/*/up.sql"))))
T = "'2026-11-22T08:00:00.000000Z'"
setup = f"""PRAGMA journal_mode = WAL; {schema}
INSERT INTO batches(id,tenant,queue,mode,on_item_failure,status,total,pending,running,completed,failed,cancelled,needs_input,request_hash,created_at,updated_at)
 VALUES ('b1','t','q','parallel','continue','running',20000,20000,0,0,0,0,0,'h',{T},{T});
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i+1 FROM n WHERE i < 19999)
INSERT INTO items(id,batch_id,tenant,queue,priority,item_index,input,config,status,blocked,attempts,max_attempts,created_at,updated_at)
 SELECT lower(hex(randomblob(16))),'b1','t','q',0,i,json_object('n',i),'{{}}','pending',0,0,3,{T},{T} FROM n;
CREATE TABLE evseq(v INTEGER); INSERT INTO evseq VALUES (0);
"""
cycle = f"""BEGIN IMMEDIATE;
CREATE TEMP TABLE IF NOT EXISTS c(seq INTEGER PRIMARY KEY); DELETE FROM c;
INSERT INTO c SELECT seq FROM items WHERE queue = 'q' AND status = 'pending' AND blocked = 0 ORDER BY priority DESC, seq LIMIT 100;
UPDATE items SET status = 'running', attempts = attempts + 1, lease_owner = 'n', lease_token = hex(randomblob(16)), lease_expires_at = {T}, started_at = {T}, updated_at = {T} WHERE seq IN (SELECT seq FROM c);
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, data, at) SELECT 'b1', (SELECT v FROM evseq) + i.item_index + 1, i.id, i.item_index, 'item.started', '{{"attempt": 1}}', {T} FROM items i WHERE i.seq IN (SELECT seq FROM c);
UPDATE evseq SET v = v + 100000;
UPDATE batches SET pending = pending - 100, running = running + 100 WHERE id = 'b1';
COMMIT;
BEGIN IMMEDIATE;
UPDATE items SET status = 'completed', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, result = '{{"ok": true}}', completed_at = {T}, updated_at = {T} WHERE seq IN (SELECT seq FROM c);
INSERT INTO events (batch_id, seq, item_id, item_index, event_type, data, at) SELECT 'b1', (SELECT v FROM evseq) + i.item_index + 1, i.id, i.item_index, 'item.completed', '{{"attempt": 1}}', {T} FROM items i WHERE i.seq IN (SELECT seq FROM c);
UPDATE evseq SET v = v + 100000;
UPDATE batches SET running = running - 100, completed = completed + 100 WHERE id = 'b1';
COMMIT;
"""
with tempfile.TemporaryDirectory() as d:
    db = os.path.join(d, "bare.db")
    subprocess.run(["sqlite3", db], input=setup, text=True, check=True, capture_output=True)
    run = "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;\n" + cycle * 200
    start = time.perf_counter()
    subprocess.run(["sqlite3", db], input=run, text=True, check=True)
    seconds = time.perf_counter() - start
    print(f"20000 items in {seconds:.3f} s: {20000 / seconds:.0f} items/s")
