#!/usr/bin/env bash
# scripts/package.sh — what `make package` runs: builds the Debian binary
# package postgresql-15-eventbus (debian/, pg_buildext) with
# `dpkg-buildpackage -us -uc -b` in a copy of the tree, so the checkout is
# never written to, and leaves the .deb files, .buildinfo, .changes and the
# build log in build/package/ (git-ignored; EVENTBUS_PACKAGE_DIR overrides).
#
# The copy holds the files git does not ignore, as they are in the working
# tree (uncommitted edits and new files included, build outputs not), or,
# outside a git checkout, the directory less build outputs. Nothing is
# downloaded.
set -euo pipefail

PROG=package.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
OUT=${EVENTBUS_PACKAGE_DIR:-$REPO/build/package}

die() { echo "$PROG: error: $*" >&2; exit 1; }

command -v dpkg-buildpackage > /dev/null || die "dpkg-buildpackage missing (run: scripts/deps.sh --package)"

version=$(dpkg-parsechangelog -l "$REPO/debian/changelog" -S Version)
upstream=${version%-*}
# The variables of a calling make (jobserver, -s) are not the package build's.
unset MAKEFLAGS MAKELEVEL MFLAGS

work=$(mktemp -d "${TMPDIR:-/tmp}/eventbus-package.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
src=$work/eventbus-$upstream
mkdir "$src"

if git -C "$REPO" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    # Tracked and untracked files that git does not ignore (so no build
    # output), as they are in the working tree; deleted ones are skipped.
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        (cd "$REPO" && while IFS= read -r -d '' f; do
            [[ -f $f || -L $f ]] && printf '%s\0' "$f"
        done) |
        tar -C "$REPO" --null --no-recursion -T - -cf - | tar -xf - -C "$src"
else
    tar -C "$REPO" --exclude=./build --exclude='*.o' --exclude='*.so' --exclude='*.bc' \
        --exclude=./results --exclude=./regression.diffs --exclude=./regression.out \
        --exclude=./test/tools/devbroker --exclude=./test/tools/natstool -cf - . |
        tar -xf - -C "$src"
fi

log=$work/build.log
echo "package: building postgresql-15-eventbus $version in $src"
start=$SECONDS
if ! (cd "$src" && dpkg-buildpackage -us -uc -b) > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    mkdir -p "$OUT" && cp "$log" "$OUT/build.log"
    die "dpkg-buildpackage failed (full log: $OUT/build.log)"
fi

mkdir -p "$OUT"
rm -f -- "$OUT"/*.deb "$OUT"/*.buildinfo "$OUT"/*.changes
cp "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes "$OUT"/
cp "$log" "$OUT/build.log"
echo "package: built in $((SECONDS - start)) s:"
for f in "$OUT"/*.deb; do
    printf '  %s (%s bytes)\n' "$f" "$(stat -c %s "$f")"
done
echo "install: dpkg -i $OUT/postgresql-15-eventbus_${version}_$(dpkg --print-architecture).deb"
