#!/usr/bin/env bash
# Backup benchmark (not a test), one run on loopback: a tenant database of about 1.3 GB
# (`pgbench -i -s 70`, SILO_BENCH_SCALE, which compresses to almost nothing, plus 256 MiB of random
# bytes, SILO_BENCH_RANDOM_MIB, which do not compress, so that the dump is large) dumped by
#   (a) pg_dump -Fc > file, the baseline,
#   (b) silo backup to file:// (pg_dump streamed through the runner: sha256, manifest),
#   (c) silo backup to S3 (versitygw on loopback, multipart upload),
# in turns, SILO_BENCH_ROUNDS times (default 2), the best of each kept; then restores of that dump
# into new databases: pg_restore --single-transaction from the file against silo restore from
# file:// and from S3 (which hold the dump's last bytes until its sha256 is checked). Prints
# seconds, MB/s of database, the ratios to the baseline and the runner's peak RSS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
SCALE="${SILO_BENCH_SCALE:-70}"
RANDOM_MIB="${SILO_BENCH_RANDOM_MIB:-256}"
ROUNDS="${SILO_BENCH_ROUNDS:-2}"

"$ROOT/e2e/scripts/install-deps.sh"
cargo build --quiet --release -p silo-controller --bin silo --manifest-path "$ROOT/Cargo.toml"
SILO="$CARGO_TARGET_DIR/release/silo"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

# On disk, not tmpfs: a gigabyte database and its dumps.
WORK="$(mktemp -d "${SILO_BENCH_DIR:-/var/tmp}/silo-bench-backup.XXXXXX")"
chmod 755 "$WORK"
cleanup() {
  "$ROOT/e2e/scripts/s3.sh" down "$WORK/s3" || true
  "$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg"
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PG_PORT="$(free_port)"
ADMIN_PW="$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
"$ROOT/e2e/scripts/postgres.sh" start "$WORK/pg" "$PG_PORT" "$ADMIN_PW"
export PGHOST=127.0.0.1 PGPORT="$PG_PORT" PGUSER=silo_admin PGPASSWORD="$ADMIN_PW" PGDATABASE=tenant
psql_admin() { psql -qAtX -d postgres "$@"; }
psql_admin -c "CREATE DATABASE tenant"
echo "bench-backup.sh: filling a database with pgbench -i -s $SCALE" >&2
"$PGBIN/pgbench" -q -i -s "$SCALE" tenant >/dev/null 2>&1
psql -qAtX -c "CREATE EXTENSION pgcrypto" \
  -c "CREATE TABLE payload AS SELECT g AS id, gen_random_bytes(1024) AS data FROM generate_series(1, $RANDOM_MIB * 1024) g"
DB_BYTES="$(psql_admin -c "SELECT pg_database_size('tenant')")"
ROWS="$(psql -qAtX -c "SELECT count(*) FROM pgbench_accounts")"

"$ROOT/e2e/scripts/s3.sh" up "$WORK/s3"
# shellcheck disable=SC1091
source "$WORK/s3/env"
S3_ENV=(AWS_ENDPOINT="$SILO_E2E_S3_ENDPOINT" AWS_REGION="$SILO_E2E_S3_REGION" AWS_ALLOW_HTTP=true
  AWS_ACCESS_KEY_ID="$SILO_E2E_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$SILO_E2E_S3_SECRET_KEY")
S3_URL="s3://$SILO_E2E_S3_BUCKET/bench"
mkdir -p "$WORK/plain" "$WORK/file"

now() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
# report FIELD FILE: a field of a runner report.
report() { python3 -c "import json,sys; print(json.load(open(sys.argv[2]))[sys.argv[1]])" "$1" "$2"; }
# rss FILE: the runner's peak RSS in MiB, from its last log line.
rss() { python3 -c "import re,sys; m=re.findall(r'peak_rss_kib=(\d+)', open(sys.argv[1]).read()); print(f'{int(m[-1])/1024:.1f}')" "$1"; }
# silo_backup DESTINATION NAME RUN [ENV...]: the report in $WORK/RUN.report, the log in $WORK/RUN.log
silo_backup() {
  local dest="$1" name="$2" run="$3"; shift 3
  env "$@" SILO_PG_DUMP="$PGBIN/pg_dump" "$SILO" backup --destination "$dest" --name "$name" \
    --tenant bench/tenant --server bench --report "$WORK/$run.report" >/dev/null 2>"$WORK/$run.log"
}

declare -A BEST
keep_best() { # keep_best KEY SECONDS
  if [[ -z "${BEST[$1]:-}" ]] || python3 -c "import sys; sys.exit(0 if $2 < ${BEST[$1]} else 1)"; then BEST[$1]="$2"; fi
}
for round in $(seq "$ROUNDS"); do
  echo "bench-backup.sh: round $round of $ROUNDS" >&2
  t0="$(now)"; "$PGBIN/pg_dump" -Fc -f "$WORK/plain/tenant.dump" tenant; t1="$(now)"
  keep_best pg_dump "$(elapsed "$t0" "$t1")"
  t0="$(now)"; silo_backup "file://$WORK/file" "r$round" "file-r$round"; t1="$(now)"
  keep_best file "$(elapsed "$t0" "$t1")"
  FILE_RSS="$(rss "$WORK/file-r$round.log")"
  t0="$(now)"; silo_backup "$S3_URL" "r$round" "s3-r$round" "${S3_ENV[@]}"; t1="$(now)"
  keep_best s3 "$(elapsed "$t0" "$t1")"
  S3_RSS="$(rss "$WORK/s3-r$round.log")"
  [[ $round == "$ROUNDS" ]] || rm -f "$WORK/file/r$round.dump" "$WORK/s3/data/$SILO_E2E_S3_BUCKET/bench/r$round.dump"
done
DUMP_BYTES="$(stat -c %s "$WORK/plain/tenant.dump")"
SILO_BYTES="$(report bytes "$WORK/file-r$ROUNDS.report")"
SHA="$(report sha256 "$WORK/file-r$ROUNDS.report")"
S3_SHA="$(report sha256 "$WORK/s3-r$ROUNDS.report")"
[[ "$(sha256sum "$WORK/file/r$ROUNDS.dump" | cut -d' ' -f1)" == "$SHA" ]] || { echo "the file's sha256 is not the report's" >&2; exit 1; }

# Restores, each into a new database; every row must arrive.
restore_check() {
  local got; got="$(psql -qAtX -d "$1" -c "SELECT count(*) FROM pgbench_accounts")"
  [[ "$got" == "$ROWS" ]] || { echo "bench-backup.sh: $1 has $got rows, not $ROWS" >&2; exit 1; }
}
into() { echo "postgres://silo_admin:$ADMIN_PW@127.0.0.1:$PG_PORT/$1"; }
psql_admin -c "CREATE DATABASE r_plain" -c "CREATE DATABASE r_file" -c "CREATE DATABASE r_s3"
t0="$(now)"; "$PGBIN/pg_restore" --single-transaction --exit-on-error --no-owner -d r_plain "$WORK/plain/tenant.dump"; t1="$(now)"
R_PLAIN="$(elapsed "$t0" "$t1")"; restore_check r_plain
t0="$(now)"
SILO_PG_RESTORE="$PGBIN/pg_restore" "$SILO" restore --source "file://$WORK/file/r$ROUNDS.dump" --sha256 "$SHA" \
  --into "$(into r_file)" --report "$WORK/restore-file.report" >/dev/null 2>"$WORK/restore-file.log"
t1="$(now)"; R_FILE="$(elapsed "$t0" "$t1")"; restore_check r_file; R_FILE_RSS="$(rss "$WORK/restore-file.log")"
t0="$(now)"
env "${S3_ENV[@]}" SILO_PG_RESTORE="$PGBIN/pg_restore" "$SILO" restore --source "$S3_URL/r$ROUNDS.dump" --sha256 "$S3_SHA" \
  --into "$(into r_s3)" --report "$WORK/restore-s3.report" >/dev/null 2>"$WORK/restore-s3.log"
t1="$(now)"; R_S3="$(elapsed "$t0" "$t1")"; restore_check r_s3; R_S3_RSS="$(rss "$WORK/restore-s3.log")"

python3 - "$DB_BYTES" "$DUMP_BYTES" "$SILO_BYTES" "${BEST[pg_dump]}" "${BEST[file]}" "${BEST[s3]}" \
  "$FILE_RSS" "$S3_RSS" "$R_PLAIN" "$R_FILE" "$R_S3" "$R_FILE_RSS" "$R_S3_RSS" "$SCALE" "$ROUNDS" "$RANDOM_MIB" <<'PY'
import sys
(db, dump, silo_dump, pg_dump, file_, s3, file_rss, s3_rss, r_plain, r_file, r_s3,
 r_file_rss, r_s3_rss, scale, rounds, random_mib) = sys.argv[1:]
db, dump, silo_dump = int(db), int(dump), int(silo_dump)
pg_dump, file_, s3, r_plain, r_file, r_s3 = map(float, (pg_dump, file_, s3, r_plain, r_file, r_s3))
mb = lambda b: b / 1e6
print(f"\nbackup benchmark: pgbench scale {scale} + {random_mib} MiB random, database {mb(db):.0f} MB, dump {mb(dump):.0f} MB "
      f"(silo's {mb(silo_dump):.0f} MB), best of {rounds}")
print(f"{'backup':<28}{'seconds':>9}{'DB MB/s':>10}{'x pg_dump':>12}{'peak RSS':>11}")
print(f"{'pg_dump -Fc > file':<28}{pg_dump:>9.2f}{mb(db)/pg_dump:>10.1f}{1.0:>12.2f}{'':>11}")
print(f"{'silo backup -> file://':<28}{file_:>9.2f}{mb(db)/file_:>10.1f}{pg_dump/file_:>12.2f}{file_rss + ' MiB':>11}")
print(f"{'silo backup -> s3://':<28}{s3:>9.2f}{mb(db)/s3:>10.1f}{pg_dump/s3:>12.2f}{s3_rss + ' MiB':>11}")
print(f"{'restore':<28}{'seconds':>9}{'':>10}{'x time':>12}{'peak RSS':>11}")
print(f"{'pg_restore -1 < file':<28}{r_plain:>9.2f}{'':>10}{1.0:>12.2f}{'':>11}")
print(f"{'silo restore <- file://':<28}{r_file:>9.2f}{'':>10}{r_file/r_plain:>12.2f}{r_file_rss + ' MiB':>11}")
print(f"{'silo restore <- s3://':<28}{r_s3:>9.2f}{'':>10}{r_s3/r_plain:>12.2f}{r_s3_rss + ' MiB':>11}")
print("targets: backup throughput >= 0.9 of pg_dump's; runner peak RSS <= 64 MiB")
PY
