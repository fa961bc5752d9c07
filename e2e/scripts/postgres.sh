#!/usr/bin/env bash
# A throw-away PostgreSQL server on loopback.
#   postgres.sh start DIR PORT PASSWORD [HOST]   initdb (admin role silo_admin) and start; with HOST
#                                                (the e2e node link's host address) it listens there
#                                                too and admits the node's pods
#   postgres.sh stop DIR                  stop immediately
# As root it runs the server as the `postgres` user, since PostgreSQL refuses to run as root.
set -euo pipefail
cmd="${1:?usage}"; DIR="${2:?usage}"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
as_pg() { if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$cmd" in
  start)
    PORT="${3:?port}"; PASSWORD="${4:?password}"; HOST="${5:-}"
    LISTEN=127.0.0.1
    mkdir -p "$DIR"
    [[ "$(id -u)" == 0 ]] && chown postgres: "$DIR"
    (umask 077 && printf '%s' "$PASSWORD" >"$DIR/pwfile")
    [[ "$(id -u)" == 0 ]] && chown postgres: "$DIR/pwfile"
    as_pg "$PGBIN/initdb" -D "$DIR/data" -U silo_admin --pwfile="$DIR/pwfile" \
      --auth-host=scram-sha-256 --auth-local=trust --no-sync -E UTF8 --locale=C >/dev/null
    rm -f "$DIR/pwfile"
    if [[ -n "$HOST" ]]; then
      LISTEN="127.0.0.1,$HOST"
      echo "host all all $HOST/15 scram-sha-256" >>"$DIR/data/pg_hba.conf"
    fi
    as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w start \
      -o "-c port=$PORT -c listen_addresses=$LISTEN -c unix_socket_directories=$DIR -c fsync=off -c max_connections=300" >/dev/null
    ;;
  stop)
    [[ -d "$DIR/data" ]] && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: postgres.sh start DIR PORT PASSWORD | stop DIR" >&2; exit 2 ;;
esac
