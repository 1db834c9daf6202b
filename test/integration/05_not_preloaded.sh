#!/usr/bin/env bash
# The SQL API without the library preloaded: a clear ERROR with a HINT.
source "$(dirname "$0")/lib.sh"

dir=$(mktemp -d /tmp/eventbus-nopreload.XXXXXX)
chown postgres "$dir"
bin=$(pg_config --bindir)
port=$(( 20000 + RANDOM % 30000 ))
runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
	-o "-p $port -c listen_addresses='' -c unix_socket_directories='$dir'" start >/dev/null
ok $? "temporary cluster without shared_preload_libraries started"
np() { psql -X -A -t -q -h "$dir" -p "$port" -U postgres -d postgres "$@" 2>&1; }
np -c "CREATE EXTENSION eventbus" >/dev/null
out=$(np -c "\\set VERBOSITY verbose" -c "SELECT * FROM eventbus_status()")
echo "$out" | sed 's/^/#   /'
ok "$(grep -q 'ERROR:  55000: eventbus is not loaded through shared_preload_libraries' <<< "$out"; echo $?)" \
	"eventbus_status() fails with SQLSTATE 55000"
ok "$(grep -q "HINT:  Add 'eventbus' to shared_preload_libraries" <<< "$out"; echo $?)" "the error carries a HINT"
out=$(np -c "\\set VERBOSITY verbose" -c "SELECT eventbus_publish('t', 'a', 'e', '{}')")
ok "$(grep -q 'ERROR:  55000: eventbus is not loaded' <<< "$out"; echo $?)" "eventbus_publish fails the same way"
runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -w -m fast stop >/dev/null
rm -rf "$dir"

done_testing
