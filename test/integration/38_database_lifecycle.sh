#!/usr/bin/env bash
# The lifecycle of eventbus.database: when it does not exist (never created,
# dropped, renamed) the launcher says so in one log line and waits, instead
# of failing and being restarted every 5 s; when a database of that name
# appears, it connects.  Plain DROP DATABASE, ALTER DATABASE RENAME and SET
# TABLESPACE, and CREATE DATABASE ... TEMPLATE of eventbus.database are not
# blocked by eventbus's own connections.  Counted
# from the server log: PostgreSQL's "database ... does not exist" FATALs,
# eventbus's own lines, and the launcher's exits (each one a restart).
source "$(dirname "$0")/lib.sh"

DB=eb_t38_life
DB2=eb_t38_renamed
DB3=eb_t38_copy
TSDIR=$("$STACK" state-dir)/t38_tablespace
LOG=$EVENTBUS_PG_LOG

restart_pg() {
	"$STACK" pg-stop fast >/dev/null
	OFF=$(stat -c %s "$LOG")
	"$STACK" pg-start >/dev/null
}
cleanup() {
	q -c "ALTER SYSTEM RESET eventbus.database" >/dev/null
	restart_pg
	for d in $DB $DB2 $DB3; do qdb postgres -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null; done
	qdb postgres -c "DROP TABLESPACE IF EXISTS t38_ts" >/dev/null
	rm -rf "$TSDIR"
	qdb postgres -c "DROP ROLE IF EXISTS t38_intruder" >/dev/null
	wait_until 60 both_connected || diag "brokers not connected again after the test"
}

# since OFFSET — the server log written after byte OFFSET.
since() { tail -c +$(($1 + 1)) "$LOG"; }
fatals() { since "$1" | grep -c "eventbus launcher FATAL:  database \"$2\" does not exist"; }
missing_lines() { since "$1" | grep -c "eventbus launcher LOG:  eventbus.database \"$2\" does not exist"; }
exits() { since "$1" | grep -c 'background worker "eventbus launcher" (PID [0-9]*) exited'; }
# launcher_row DB — the launcher's state and detail, read from database DB.
launcher_row() {
	qdb "$1" -c "SELECT state || '|' || coalesce(detail, '') FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL" 2>/dev/null
}
connected_in() {
	[ "$(qdb "$1" -c "SELECT count(*) FROM eventbus_status() WHERE component = 'launcher' AND transport IS NOT NULL AND state = 'connected'")" = 2 ] &&
		[ "$(qdb "$1" -c "SELECT state FROM eventbus_status() WHERE component = 'launcher' AND transport IS NULL")" = running ]
}
# observe SECONDS_FROM START — sleep until that many seconds after START.
observe() { local left=$(($2 + $1 - SECONDS)); [ $left -gt 0 ] && sleep $left; }

for d in $DB $DB2 $DB3; do qdb postgres -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null; done
qdb postgres -c "DROP TABLESPACE IF EXISTS t38_ts" >/dev/null
rm -rf "$TSDIR"
trap cleanup EXIT

# 1. eventbus.database names a database that does not exist.  The stack's
#    own database keeps its extension, so eventbus_status() is read there.
q -c "ALTER SYSTEM SET eventbus.database = '$DB'" >/dev/null
restart_pg
start=$SECONDS
wait_until 30 '[ "$(launcher_row eventbus)" = "waiting for database|database \"$DB\" does not exist" ]'
ok $? "missing database: the launcher waits for it (eventbus_status: $(launcher_row eventbus))"
observe 12 $start
diag "after $((SECONDS - start)) s: $(fatals "$OFF" $DB) FATAL, $(missing_lines "$OFF" $DB) eventbus line, $(exits "$OFF") launcher exits"
is "$(fatals "$OFF" $DB)" 1 "missing database: one 'database does not exist' FATAL (the first attempt), not one per restart"
is "$(missing_lines "$OFF" $DB)" 1 "missing database: one eventbus log line saying so"
is "$(exits "$OFF")" 1 "missing database: the launcher exited once, no restart loop"
since "$OFF" | grep -A2 "eventbus.database \"$DB\" does not exist" | sed 's/^/# /'

# 2. The database is created: the launcher connects within a bound.
off=$(stat -c %s "$LOG")
t0=$SECONDS
qdb postgres -c "CREATE DATABASE $DB" >/dev/null || bail "CREATE DATABASE $DB"
qdb $DB -c "CREATE EXTENSION eventbus" >/dev/null || bail "CREATE EXTENSION in $DB"
wait_until 30 "connected_in $DB"
ok $? "database created: the launcher connects to it, both brokers connected"
diag "connected $((SECONDS - t0)) s after CREATE DATABASE"
is "$(fatals "$off" $DB)" 0 "database created: no FATAL on the way"
wait_until 30 '[ "$(qdb $DB -c "SELECT state FROM eventbus_status() WHERE component = '"'dispatcher'"' AND transport IS NULL")" = running ]'
ok $? "database created: the dispatcher runs"

# Statements that PostgreSQL refuses do not disturb eventbus: DROP / RENAME
# by a role that does not own the database, DROP in a transaction block.
qdb postgres -c "DROP ROLE IF EXISTS t38_intruder" -c "CREATE ROLE t38_intruder CREATEDB" >/dev/null
lp=$(launcher_pid)
off=$(stat -c %s "$LOG")
r1=$(qdb postgres -c "SET ROLE t38_intruder" -c "DROP DATABASE $DB")
r2=$(qdb postgres -c "SET ROLE t38_intruder" -c "ALTER DATABASE $DB RENAME TO $DB2")
r3=$(qdb postgres -c "BEGIN" -c "DROP DATABASE $DB")
case "$r1|$r2|$r3" in *"must be owner"*"must be owner"*"cannot run inside a transaction block"*) r=0 ;; *) r=1; diag "$r1|$r2|$r3" ;; esac
ok $r "DROP / RENAME by a non-owner and DROP in a transaction block fail as PostgreSQL says"
is "$(launcher_pid)|$(since "$off" | grep -c 'disconnects from it')" "$lp|0" \
	"... and the launcher stayed connected (same pid, no disconnect)"

# 3. Plain DROP DATABASE, while the launcher, dispatcher and pool are connected.
off=$(stat -c %s "$LOG")
t0=$SECONDS
err=$(qdb postgres -c "DROP DATABASE $DB")
is "$err" "" "plain DROP DATABASE of eventbus.database succeeds"
diag "DROP DATABASE took $((SECONDS - t0)) s"
start=$SECONDS
wait_until 30 '[ "$(launcher_row eventbus)" = "waiting for database|database \"$DB\" does not exist" ]'
ok $? "after DROP DATABASE the launcher waits for the database"
observe 12 $start
diag "after $((SECONDS - start)) s: $(fatals "$off" $DB) FATAL, $(missing_lines "$off" $DB) eventbus line, $(exits "$off") launcher exits"
is "$(fatals "$off" $DB)" 0 "after DROP DATABASE: no 'database does not exist' FATAL"
is "$(missing_lines "$off" $DB)" 1 "after DROP DATABASE: one eventbus log line saying it is missing"
is "$(exits "$off")" 1 "after DROP DATABASE: the launcher exited once (to disconnect), no restart loop"

# 4. A database of that name is created again: the launcher returns to it.
t0=$SECONDS
qdb postgres -c "CREATE DATABASE $DB" >/dev/null || bail "CREATE DATABASE $DB again"
qdb $DB -c "CREATE EXTENSION eventbus" >/dev/null || bail "CREATE EXTENSION in $DB again"
wait_until 30 "connected_in $DB"
ok $? "database created again: the launcher connects to it"
diag "connected $((SECONDS - t0)) s after CREATE DATABASE"
qdb $DB -c "CREATE TABLE kept (n int); INSERT INTO kept VALUES (38)" >/dev/null

# 5. Rename, as the README documents: ALTER DATABASE RENAME (not blocked),
#    one log line, then eventbus.database set to the new name and a restart.
off=$(stat -c %s "$LOG")
err=$(qdb postgres -c "ALTER DATABASE $DB RENAME TO $DB2")
is "$err" "" "plain ALTER DATABASE RENAME of eventbus.database succeeds"
wait_until 30 '[ "$(launcher_row eventbus)" = "waiting for database|database \"$DB\" does not exist" ]'
ok $? "after the rename the launcher waits for a database of the old name"
sleep 6
is "$(fatals "$off" $DB)|$(missing_lines "$off" $DB)|$(exits "$off")" "0|1|1" \
	"after the rename: no FATAL, one eventbus line, one launcher exit"
qdb postgres -c "ALTER SYSTEM SET eventbus.database = '$DB2'" >/dev/null
restart_pg
wait_until 30 "connected_in $DB2"
ok $? "eventbus.database set to the new name and PostgreSQL restarted: the launcher connects to it"
is "$(qdb $DB2 -c "SELECT n FROM kept")" 38 "the renamed database kept its data"
is "$(fatals "$OFF" $DB2)" 0 "no FATAL for the renamed database"

# 6. Copying and moving it need it free of sessions too: CREATE DATABASE ...
#    TEMPLATE and ALTER DATABASE ... SET TABLESPACE run while eventbus is
#    connected, and the launcher connects again afterwards.
wait_until 30 '[ "$(qdb $DB2 -c "SELECT state FROM eventbus_status() WHERE component = '"'dispatcher'"' AND transport IS NULL")" = running ]' ||
	diag "the dispatcher does not run before the copy"
off=$(stat -c %s "$LOG")
err=$(qdb postgres -c "CREATE DATABASE $DB3 TEMPLATE $DB2")
is "$err" "" "CREATE DATABASE ... TEMPLATE eventbus.database succeeds while eventbus runs"
is "$(qdb $DB3 -c "SELECT n FROM kept" 2>&1)" 38 "... and the copy holds the data"
wait_until 30 "connected_in $DB2"
ok $? "after the copy the launcher connects to eventbus.database again"
is "$(since "$off" | grep -c 'is being dropped, renamed, moved or copied, the launcher disconnects from it')" 1 \
	"after the copy: one eventbus line saying why it disconnected"
qdb postgres -c "DROP DATABASE $DB3" >/dev/null

mkdir -p "$TSDIR" && chown postgres: "$TSDIR" || bail "could not create $TSDIR"
qdb postgres -c "CREATE TABLESPACE t38_ts LOCATION '$TSDIR'" >/dev/null || bail "CREATE TABLESPACE"
off=$(stat -c %s "$LOG")
err=$(qdb postgres -c "ALTER DATABASE $DB2 SET TABLESPACE t38_ts")
is "$err" "" "ALTER DATABASE ... SET TABLESPACE of eventbus.database succeeds while eventbus runs"
is "$(qdb $DB2 -c "SELECT t.spcname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = current_database()")" t38_ts \
	"... and the database moved"
wait_until 30 "connected_in $DB2"
ok $? "after the move the launcher connects to eventbus.database again"
is "$(qdb $DB2 -c "SELECT n FROM kept")|$(fatals "$off" $DB2)" "38|0" "after the move: data kept, no FATAL"

done_testing
