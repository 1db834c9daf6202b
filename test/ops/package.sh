#!/usr/bin/env bash
# Packaging in the ecosystem's conventions: META.json is valid PGXN metadata
# whose versions match eventbus.control; `make package` builds the Debian
# package postgresql-15-eventbus (dpkg-buildpackage, pg_buildext) without the
# network and without writing to the checkout; the .deb holds the library and
# the extension files where PostgreSQL 15 looks for them; `dpkg -i` installs
# it, and a throwaway cluster of the system PostgreSQL 15 preloads the
# installed library, runs CREATE EXTENSION eventbus and answers
# eventbus_status().
#
# Installing writes to the system PostgreSQL 15 directories (and replaces the
# files a `make install` with the system pg_config put there): run it on a
# development or CI machine, not next to a production cluster.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd -P)
PGBIN=/usr/lib/postgresql/15/bin
PKGDIR=$REPO/build/package
PKG=postgresql-15-eventbus
TAP_N=0
TAP_FAILED=0

indent() { sed 's/^/#   /'; }

ok() {   # ok CONDITION_EXIT_STATUS DESCRIPTION
	TAP_N=$((TAP_N + 1))
	if [ "$1" -eq 0 ]; then echo "ok $TAP_N - $2"; else echo "not ok $TAP_N - $2"; TAP_FAILED=$((TAP_FAILED + 1)); fi
}
is() {   # is GOT EXPECTED DESCRIPTION
	TAP_N=$((TAP_N + 1))
	if [ "$1" == "$2" ]; then
		echo "ok $TAP_N - $3"
	else
		echo "not ok $TAP_N - $3"
		echo "got:      '$1'" | indent
		echo "expected: '$2'" | indent
		TAP_FAILED=$((TAP_FAILED + 1))
	fi
}
diag() { echo "# $*"; }
bail() { echo "Bail out! $*"; exit 255; }

# as_pg CMD... — server programs refuse to run as root: run them as postgres.
as_pg() {
	if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && "$@"); fi
}

# ---------------------------------------------------------------- META.json
ctl_version=$(sed -n "s/^default_version *= *'\(.*\)'.*/\1/p" "$REPO/eventbus.control")
[ -n "$ctl_version" ] || bail "no default_version in eventbus.control"
diag "eventbus.control default_version = $ctl_version"

out=$(python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$REPO/META.json" 2>&1)
ok $? "META.json is valid JSON"
[ -z "$out" ] || echo "$out" | indent

# Prints one line per problem: a PGXN required key missing or empty, a
# version or file that does not match the tree.
out=$(python3 - "$REPO" "$ctl_version" <<'EOF' 2>&1
import json, os, sys
repo, ctl_version = sys.argv[1], sys.argv[2]
meta = json.load(open(os.path.join(repo, "META.json")))
for key in ("name", "abstract", "version", "maintainer", "license", "provides", "meta-spec"):
    if not meta.get(key):
        print("required key missing or empty: %s" % key)
if meta.get("meta-spec", {}).get("version") != "1.0.0":
    print("meta-spec.version is not 1.0.0")
if meta.get("name") != "eventbus":
    print("name is %r" % meta.get("name"))
if meta.get("version") != ctl_version:
    print("version %r != eventbus.control %r" % (meta.get("version"), ctl_version))
ext = meta.get("provides", {}).get("eventbus")
if not ext:
    print("provides has no eventbus")
else:
    for key in ("file", "version"):
        if not ext.get(key):
            print("provides.eventbus.%s missing" % key)
    if ext.get("version") != ctl_version:
        print("provides.eventbus.version %r != %r" % (ext.get("version"), ctl_version))
    if ext.get("file") != "sql/eventbus--%s.sql" % ctl_version:
        print("provides.eventbus.file is %r" % ext.get("file"))
    elif not os.path.isfile(os.path.join(repo, ext["file"])):
        print("provides.eventbus.file %s does not exist" % ext["file"])
    if ext.get("docfile") and not os.path.isfile(os.path.join(repo, ext["docfile"])):
        print("provides.eventbus.docfile %s does not exist" % ext["docfile"])
req = meta.get("prereqs", {}).get("runtime", {}).get("requires", {})
if "PostgreSQL" not in req:
    print("prereqs.runtime.requires has no PostgreSQL")
EOF
)
is "$out" "" "META.json has the PGXN required keys; its versions and file match eventbus.control"

deb_version=$(dpkg-parsechangelog -l "$REPO/debian/changelog" -S Version)
is "${deb_version%-*}" "$ctl_version" "debian/changelog's upstream version is eventbus.control's ($deb_version)"

# ---------------------------------------------------------------- build
git_state() { git -C "$REPO" status --porcelain --untracked-files=all 2>/dev/null; }
before=$(git_state)
# Without a network namespace's interfaces the build proves it downloads nothing.
netns=()
if unshare -n true 2>/dev/null; then
	netns=(unshare -n)
	diag "building without network (unshare -n)"
fi
start=$SECONDS
"${netns[@]}" make -C "$REPO" --no-print-directory package > "${TMPDIR:-/tmp}/eventbus-ops-package.$$.log" 2>&1
rc=$?
indent < "${TMPDIR:-/tmp}/eventbus-ops-package.$$.log"
rm -f "${TMPDIR:-/tmp}/eventbus-ops-package.$$.log"
ok $rc "make package (dpkg-buildpackage -us -uc -b) succeeds"
# The test tools (Kafka dev broker, natstool) are not the package's.
! grep -qE -- '-o test/tools/(devbroker|natstool)' "$PKGDIR/build.log"
ok $? "the package build compiles only the extension, not the test tools"
diag "make package took $((SECONDS - start)) s"
if git -C "$REPO" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
	is "$(git_state)" "$before" "the checkout is unchanged by the build (git status)"
else
	ok 0 "# SKIP not a git checkout"
fi

deb=$PKGDIR/${PKG}_${deb_version}_$(dpkg --print-architecture).deb
[ -f "$deb" ] || bail "$deb was not built"
diag "$(basename "$deb"): $(stat -c %s "$deb") bytes"

contents=$(dpkg-deb -c "$deb" | awk '{print $NF}' | sed 's|^\./|/|')
# Here-strings, not echo | grep -q: with pipefail, grep leaving at the
# first match can fail the pipeline with echo's SIGPIPE.
has() { grep -qxF "$1" <<< "$contents"; }
has /usr/lib/postgresql/15/lib/eventbus.so
ok $? "the .deb holds /usr/lib/postgresql/15/lib/eventbus.so"
has /usr/share/postgresql/15/extension/eventbus.control &&
	has "/usr/share/postgresql/15/extension/eventbus--$ctl_version.sql"
ok $? "the .deb holds eventbus.control and eventbus--$ctl_version.sql in /usr/share/postgresql/15/extension/"
stray=$(echo "$contents" | grep -vE '^/$|^/usr/$|^/usr/(lib|share)/$|^/usr/lib/postgresql/(15/(lib/.*)?)?$|^/usr/share/postgresql/(15/(extension/.*)?)?$|^/usr/share/doc/(postgresql-15-eventbus/.*)?$')
is "$stray" "" "nothing else in the .deb (no test tools, nothing outside PostgreSQL 15's directories and the doc directory)"
depends=$(dpkg-deb -f "$deb" Depends)
diag "Depends: $depends"
grep -qE '(^|, )postgresql-15( |,|$)' <<< "$depends" &&
	grep -qE '(^|, )librdkafka1( |,|$)' <<< "$depends" &&
	grep -qE '(^|, )libnats3\.4( |,|$)' <<< "$depends"
ok $? "it depends on postgresql-15, librdkafka1 and libnats3.4"

# ---------------------------------------------------------------- install
[ "$(id -u)" -eq 0 ] || bail "the rest installs the package with dpkg -i: run as root"
diag "before: $(dpkg-query -W -f '${Package} ${Version} ${Status}' "$PKG" 2>/dev/null || echo "$PKG not installed")"
out=$(dpkg -i "$deb" 2>&1)
ok $? "dpkg -i installs it"
echo "$out" | indent
is "$(dpkg-query -W -f '${Version} ${Status}' "$PKG" 2>&1)" "$deb_version install ok installed" "dpkg reports $PKG $deb_version installed"
out=$(dpkg -V "$PKG" 2>&1)
is "$out" "" "the installed files are the package's (dpkg -V)"

# ---------------------------------------------------------------- use
dir=$(mktemp -d "${TMPDIR:-/tmp}/eventbus-ops-pkg.XXXXXX")
chmod 0755 "$dir"
[ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
# A unix socket in a private directory only: no TCP port is taken.
port=$((20000 + RANDOM % 30000))
cleanup() {
	if [ -f "$dir/data/postmaster.pid" ]; then
		as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop > /dev/null 2>&1 ||
			as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop > /dev/null 2>&1
	fi
	rm -rf -- "$dir"
}
trap cleanup EXIT

as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --locale=C > "$dir/initdb.log" 2>&1 ||
	{ indent < "$dir/initdb.log"; bail "initdb failed"; }
start=$SECONDS
as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
	-o "-p $port -c listen_addresses='' -c unix_socket_directories='$dir' -c shared_preload_libraries=eventbus -c eventbus.nats_url=nats://127.0.0.1:1" \
	start > /dev/null 2>&1
rc=$?
ok $rc "a throwaway PostgreSQL 15 cluster with shared_preload_libraries = 'eventbus' starts"
[ $rc -eq 0 ] || { tail -n 20 "$dir/log" | indent; bail "the cluster did not start"; }
pm=$(head -1 "$dir/data/postmaster.pid")
grep -qF " /usr/lib/postgresql/15/lib/eventbus.so" "/proc/$pm/maps"
ok $? "the postmaster has loaded the installed /usr/lib/postgresql/15/lib/eventbus.so"

p() { psql -X -A -t -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres "$@" 2>&1; }
out=$(p -c "CREATE EXTENSION eventbus")
is "$out" "" "CREATE EXTENSION eventbus"
is "$(p -c "SELECT extversion FROM pg_extension WHERE extname = 'eventbus'")" "$ctl_version" "the extension is at version $ctl_version"
# The launcher registers itself at start. NATS points at a closed port (the
# transport is configured, its broker down), Kafka is off.
out=$(p -c "SELECT component, transport, state FROM eventbus_status() ORDER BY 1, 2")
grep -q '^launcher|' <<< "$out"
ok $? "eventbus_status() answers with the launcher's rows"
echo "$out" | indent
# Once it sees the extension, the relay tries the configured broker.
for _ in $(seq 1 150); do
	out=$(p -c "SELECT state FROM eventbus_status() WHERE component = 'launcher' AND transport = 'nats'")
	case $out in connecting|down) break ;; esac
	sleep 0.2
done
diag "launcher, nats: $out"
case $out in connecting|down) rc=0 ;; *) rc=1 ;; esac
ok $rc "the installed library's relay tries the configured NATS server (state connecting or down)"
out=$(p -c "SELECT eventbus_publish('orders', 'a1', 'created', '{}', 'nats')" -c "SELECT count(*) FROM eventbus.outbox")
echo "$out" | tail -n 1 | grep -qx 1
ok $? "eventbus_publish() on NATS, its broker down, writes an outbox row"
diag "cluster start to answers: $((SECONDS - start)) s"

as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop > /dev/null 2>&1
ok $? "the cluster stops (fast)"
left=$(for d in /proc/[0-9]*; do
	[ "$(readlink "$d/cwd" 2>/dev/null)" = "$dir/data" ] && echo "${d#/proc/}"
done)
is "$left" "" "no process of the throwaway cluster is left"

echo "1..$TAP_N"
[ "$TAP_FAILED" -eq 0 ]
