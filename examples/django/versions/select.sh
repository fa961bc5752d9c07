#!/bin/sh
# select.sh VERSION MIGRATIONS_DIR: puts the migrations of VERSION (v1, v2, v3) in MIGRATIONS_DIR.
set -eu
here="$(dirname "$0")"
cp "$here/0001_initial.py" "$2/"
case "$1" in
  v1) ;;
  v2) cp "$here/0002_price_positive.v2.py" "$2/0002_price_positive.py" ;;
  v3) cp "$here/0002_price_positive.v3.py" "$2/0002_price_positive.py" ;;
  *) echo "select.sh: unknown version $1 (v1, v2, v3)" >&2; exit 2 ;;
esac
