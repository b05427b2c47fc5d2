#!/bin/bash
# The claim-and-finish cycle of batchd as bare SQL on batchd's schema, timed by pgbench:
# each pgbench transaction claims 100 items and completes them (two commits), with the
# statements batchd runs since range claims and event runs (migrations 000004, 000005).
# Usage: scripts/bare-cycle/postgres.sh [CLIENTS]   (needs psql and pgbench; uses
# postgres://postgres@127.0.0.1:5432, creates and drops the database batchd_bare_cycle)
set -euo pipefail
cd "$(dirname "$0")"
clients=${1:-1}
psql=(psql -h 127.0.0.1 -U postgres -qAt)
db=batchd_bare_cycle
"${psql[@]}" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap '"${psql[@]}" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
for m in ../../migrations/postgres/*/up.sql; do "${psql[@]}" -d $db -f "$m"; done
"${psql[@]}" -d $db -f postgres-setup.sql
pgbench -h 127.0.0.1 -U postgres -n -c "$clients" -t $((400 / clients)) -f postgres-claim-finish.sql $db | grep -E '^tps'
echo "items/s = tps x 100"
