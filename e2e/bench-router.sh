#!/usr/bin/env bash
# Router benchmark (not a test), one run on loopback: pgbench against (a) PostgreSQL directly,
# (b) Debian's PgBouncer configured the same way (transaction pooling, 20 server connections per
# tenant, SCRAM), (c) silo-router. Cases: select-only with 50 clients on one tenant; 200 tenants x 2
# clients (a custom script per tenant); connection churn (-C); a single client (-c 1 -j 1,
# select-only, one tenant). Then (idle) the router's RSS with 10,000 idle tenants configured, and,
# on a local control plane: (ready) with the controller, the time from a Tenant turning Ready to
# its first query through the router; (fleet) with 2,000 live tenants learned from Kubernetes, the
# router's RSS and the time from one Tenant's change (suspend, new password) to the router acting
# on it while 100 other tenants change at once. SILO_BENCH_SECONDS sets each run's length (default
# 10); SILO_BENCH_CASES picks cases (default "select multi churn single idle ready fleet").
# Besides TPS and latency, every case prints each pooler's CPU time per transaction: the time its
# threads spent on a CPU (user + system, in ns: the first field of /proc/<pid>/task/*/schedstat,
# summed over the threads), sampled before and after each pgbench run, divided by the transactions
# pgbench reports, and the router/PgBouncer ratio; and its context switches per transaction
# (voluntary + involuntary, /proc/<pid>/task/*/status), which counts its wake-ups. Unlike TPS these
# do not depend on how much of the two cores the scheduler gives the pooler among pgbench and
# PostgreSQL's processes. The window includes the clients' logins (SCRAM), so churn is mostly those.
# The single-client case prints each target's mean latency (1 / TPS, in us) and the poolers'
# overhead over direct; direct runs twice there (first and last), as it is the reference.
# SILO_BENCH_BASELINE_ROUTER=/path/to/an/older/silo-router runs that binary too, configured the
# same, in the order pgbouncer router baseline baseline router pgbouncer, and prints router/baseline:
# "no slower than before", measured in one script against one PostgreSQL; the fleet case measures
# it as well (router baseline baseline router).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
SECONDS_PER_RUN="${SILO_BENCH_SECONDS:-10}"
TENANTS=200

"$ROOT/e2e/scripts/install-deps.sh"
if ! command -v pgbouncer >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
fi
cargo build --quiet --release -p silo-router -p silo-controller -p silo-e2e --manifest-path "$ROOT/Cargo.toml"
ROUTER_BIN="$CARGO_TARGET_DIR/release/silo-router"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

WORK="$(mktemp -d /tmp/silo-bench-router.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
export SILO_E2E_DIR="$WORK" SILO_E2E_NODE=0
# shellcheck source=scripts/harness.sh
source "$ROOT/e2e/scripts/harness.sh"
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  harness_down "$WORK" || true
  [[ -f "$WORK/pgbouncer.pid" ]] && kill "$(cat "$WORK/pgbouncer.pid")" 2>/dev/null || true
  "$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg"
  # The servers bench_router_ready started, if it was interrupted.
  for pid in "$WORK"/pg-*/data/postmaster.pid; do
    [[ -f "$pid" ]] && kill -9 "$(head -1 "$pid")" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

PG_PORT="$(free_port)"; BOUNCER_PORT="$(free_port)"; ROUTER_PORT="$(free_port)"; ROUTER_HTTP="$(free_port)"
ADMIN_PW="$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
"$ROOT/e2e/scripts/postgres.sh" start "$WORK/pg" "$PG_PORT" "$ADMIN_PW"
# Room for the direct runs (50 and 400 clients) and the poolers' server connections (the baseline
# router's too).
"$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg"
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w start \
  -o "-c port=$PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK/pg -c fsync=off -c max_connections=2000 -c shared_buffers=128MB" >/dev/null
export PGPASSWORD="$ADMIN_PW"
psql_admin() { psql -qAtX -h 127.0.0.1 -p "$PG_PORT" -U silo_admin -d postgres "$@"; }

echo "bench-router.sh: creating $TENANTS tenants" >&2
{
  for i in $(seq 0 "$TENANTS"); do
    echo "CREATE ROLE t_$i LOGIN PASSWORD 'pw_$i';"
    echo "CREATE DATABASE t_$i OWNER t_$i;"
  done
} | psql_admin >/dev/null
PGPASSWORD=pw_0 "$PGBIN/pgbench" -q -i -s 1 -h 127.0.0.1 -p "$PG_PORT" -U t_0 t_0 >/dev/null 2>&1

# The same tenants for PgBouncer and the router.
{
  echo "[databases]"
  for i in $(seq 0 "$TENANTS"); do echo "t_$i = host=127.0.0.1 port=$PG_PORT dbname=t_$i"; done
  echo "[pgbouncer]"
  echo "listen_addr = 127.0.0.1"
  echo "listen_port = $BOUNCER_PORT"
  echo "unix_socket_dir ="
  echo "auth_type = scram-sha-256"
  echo "auth_file = $WORK/userlist.txt"
  echo "pool_mode = transaction"
  echo "default_pool_size = 20"
  echo "max_client_conn = 5000"
  echo "pidfile = $WORK/pgbouncer.pid"
  echo "logfile = $WORK/pgbouncer.log"
} >"$WORK/pgbouncer.ini"
for i in $(seq 0 "$TENANTS"); do echo "\"t_$i\" \"pw_$i\""; done >"$WORK/userlist.txt"
# On a server with a connection budget, as every tenant learned from Kubernetes is (its
# DatabaseServer's maxConnections): a release asks the budget whether to keep the connection.
{
  echo "servers: {pg: {maxConnections: 500}}"
  echo "tenants:"
  for i in $(seq 0 "$TENANTS"); do
    echo "- {name: t$i, host: 127.0.0.1, port: $PG_PORT, database: t_$i, user: t_$i, password: pw_$i, connectionLimit: 20, server: pg}"
  done
} >"$WORK/tenants.yaml"
chown -R postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
chmod 777 "$WORK"
runuser -u postgres -- pgbouncer -d "$WORK/pgbouncer.ini"
"$ROUTER_BIN" --config "$WORK/tenants.yaml" --listen "127.0.0.1:$ROUTER_PORT" --http-addr "127.0.0.1:$ROUTER_HTTP" \
  --pool-mode transaction --log-filter warn ${SILO_ROUTER_WORKER_THREADS:+--worker-threads "$SILO_ROUTER_WORKER_THREADS"} >"$WORK/router.log" 2>&1 &
ROUTER_PID=$!
PIDS+=("$ROUTER_PID")
wait_port "$BOUNCER_PORT"; wait_port "$ROUTER_PORT"
BOUNCER_PID="$(cat "$WORK/pgbouncer.pid")"
BASELINE="${SILO_BENCH_BASELINE_ROUTER:-}"
if [[ -n "$BASELINE" ]]; then
  BASELINE_PORT="$(free_port)"
  "$BASELINE" --config "$WORK/tenants.yaml" --listen "127.0.0.1:$BASELINE_PORT" --http-addr "127.0.0.1:$(free_port)" \
    --pool-mode transaction --log-filter warn ${SILO_ROUTER_WORKER_THREADS:+--worker-threads "$SILO_ROUTER_WORKER_THREADS"} >"$WORK/baseline.log" 2>&1 &
  BASELINE_PID=$!
  PIDS+=("$BASELINE_PID")
  wait_port "$BASELINE_PORT"
fi

# target -> port and the database name a client gives for tenant i
port_of() { case "$1" in direct) echo "$PG_PORT";; pgbouncer) echo "$BOUNCER_PORT";; router) echo "$ROUTER_PORT";; baseline) echo "$BASELINE_PORT";; esac; }
db_of() { if [[ "$1" == router || "$1" == baseline ]]; then echo "t$2"; else echo "t_$2"; fi; }
printf 'SELECT 1;\n' >"$WORK/select1.sql"

# target -> the pooler's process id (none for direct)
pid_of() { case "$1" in pgbouncer) echo "$BOUNCER_PID";; router) echo "$ROUTER_PID";; baseline) echo "$BASELINE_PID";; esac; }
# "cpu_ns context_switches" of a process so far, summed over its threads: schedstat's first field
# is the time on a CPU in ns (user + system), finer than stat's utime + stime in clock ticks.
usage_of() {
  local pid="$1"
  [[ -z "$pid" ]] && { echo "0 0"; return; }
  # %.0f, not %d: mawk's %d stops at 2^31 (2.1 s in ns).
  awk 'FILENAME ~ /schedstat$/ {ns += $1; next}
       /^(non)?voluntary_ctxt_switches:/ {cs += $2}
       END {printf "%.0f %.0f", ns, cs}' "/proc/$pid"/task/*/schedstat "/proc/$pid"/task/*/status 2>/dev/null
}

# Prints "tps latency_ms transactions" for one pgbench run.
run_pgbench() {
  local out
  out="$("$PGBIN/pgbench" -n "$@" 2>&1)" || { echo "pgbench failed: $out" >&2; return 1; }
  local tps lat tx
  tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)"
  lat="$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' <<<"$out" | head -1)"
  tx="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out" | head -1)"
  echo "$tps ${lat:-0} ${tx:-0}"
}

case_name() {
  case "$1" in
    select) echo "select-only, 50 clients" ;;
    multi) echo "$TENANTS tenants x 2 clients" ;;
    churn) echo "connection churn (-C), 10 clients" ;;
    single) echo "single client (-c 1), select-only" ;;
  esac
}

# Prints "tps latency_ms transactions" for one case against one target.
run_case() {
  local target="$1" port i
  port="$(port_of "$target")"
  case "$2" in
    select)
      PGPASSWORD=pw_0 run_pgbench -S -c 50 -j 2 -T "$SECONDS_PER_RUN" -h 127.0.0.1 -p "$port" -U t_0 "$(db_of "$target" 0)"
      ;;
    multi)
      local pids=()
      for i in $(seq 1 "$TENANTS"); do
        PGPASSWORD="pw_$i" run_pgbench -f "$WORK/select1.sql" -c 2 -j 1 -T "$SECONDS_PER_RUN" -h 127.0.0.1 -p "$port" -U "t_$i" "$(db_of "$target" "$i")" >"$WORK/multi-$target-$i.txt" &
        pids+=($!)
      done
      wait "${pids[@]}"
      cat "$WORK"/multi-"$target"-*.txt | awk '{t+=$1; l+=$2; x+=$3; n++} END {printf "%.1f %.3f %.0f", t, l/n, x}'
      ;;
    churn)
      PGPASSWORD=pw_0 run_pgbench -S -C -c 10 -j 2 -T "$SECONDS_PER_RUN" -h 127.0.0.1 -p "$port" -U t_0 "$(db_of "$target" 0)"
      ;;
    single)
      PGPASSWORD=pw_0 run_pgbench -S -c 1 -j 1 -T "$SECONDS_PER_RUN" -h 127.0.0.1 -p "$port" -U t_0 "$(db_of "$target" 0)"
      ;;
  esac
}

# Prints "tps latency_ms transactions cpu_ns context_switches": one case against one target, with
# what the target's pooler process used meanwhile.
measure_case() {
  local pid before after out
  pid="$(pid_of "$1")"
  before="$(usage_of "$pid")"
  out="$(run_case "$@")"
  after="$(usage_of "$pid")"
  read -r b_ns b_cs <<<"$before"
  read -r a_ns a_cs <<<"$after"
  echo "$out $((a_ns - b_ns)) $((a_cs - b_cs))"
}

# Each case runs against PgBouncer and the router twice, in the order A B B A, so that a drift in
# the machine's speed over the run (the other tenants of a VM, CPU clocks) weighs on both alike;
# the table shows the mean of the two runs and each run's TPS. Direct runs once, except in the
# single-client case, where it is the reference for the poolers' overhead: there it runs first and last.
CASES="${SILO_BENCH_CASES:-select multi churn single idle ready fleet}"
has_case() { [[ " $CASES " == *" $1 "* ]]; }
PGBENCH_CASES=""
for c in $CASES; do case "$c" in select | multi | churn | single) PGBENCH_CASES+=" $c" ;; esac; done
declare -A RESULT
for c in $PGBENCH_CASES; do
  targets="direct pgbouncer router router pgbouncer"
  [[ -n "$BASELINE" ]] && targets="direct pgbouncer router baseline baseline router pgbouncer"
  [[ "$c" == single ]] && targets="$targets direct"
  for target in $targets; do
    [[ "$target" == direct && "$c" != single && -n "${RESULT[direct,$c]:-}" ]] && continue
    echo "bench-router.sh: $target: $(case_name "$c")" >&2
    RESULT[$target,$c]+="$(measure_case "$target" "$c");"
  done
done
# "mean_tps mean_latency run1_tps/run2_tps cpu_us_per_tx cs_per_tx" of the runs recorded for a
# target and case: CPU time and context switches over all its runs' transactions.
summary() {
  tr ';' '\n' <<<"$1" | awk 'NF {t+=$1; l+=$2; x+=$3; ns+=$4; cs+=$5; n++; runs = runs (runs ? "/" : "") sprintf("%.0f", $1)}
    END {printf "%.1f %.3f %s %.2f %.2f", t/n, l/n, runs, (x ? ns/x/1000 : 0), (x ? cs/x : 0)}'
}
ratio() { python3 -c "print(f'{$1 / $2:.2f}' if $2 else '-')"; }

# RSS with 10,000 idle tenants configured.
if has_case idle; then
  {
    echo "tenants:"
    for i in $(seq 1 10000); do
      echo "- {name: idle$i, host: 127.0.0.1, port: $PG_PORT, database: t_$i, user: t_$i, password: pw_$i}"
    done
  } >"$WORK/idle.yaml"
  IDLE_PORT="$(free_port)"; IDLE_HTTP="$(free_port)"
  "$ROUTER_BIN" --config "$WORK/idle.yaml" --listen "127.0.0.1:$IDLE_PORT" --http-addr "127.0.0.1:$IDLE_HTTP" --log-filter warn >/dev/null 2>&1 &
  IDLE_PID=$!
  PIDS+=("$IDLE_PID")
  wait_port "$IDLE_PORT"
  sleep 1
  IDLE_RSS_KB="$(awk '/^VmRSS:/ {print $2}' "/proc/$IDLE_PID/status")"
fi

if has_case ready || has_case fleet; then
  harness_up "$WORK" >&2
  export SILO_CONTROLLER_BIN="$CARGO_TARGET_DIR/release/silo-controller" SILO_ROUTER_BIN="$ROUTER_BIN"
fi
if has_case ready; then
  echo "bench-router.sh: Ready to first routed query, on a local control plane" >&2
  READY_LINE="$("$CARGO_TARGET_DIR/release/bench_router_ready" --tenants 20)"
fi
if has_case fleet; then
  echo "bench-router.sh: 2,000 live tenants from kubernetes, on a local control plane" >&2
  FLEET_LINES="$("$CARGO_TARGET_DIR/release/bench_router_fleet" --tenants 2000 --others 100)"
fi

echo
if [[ -n "$PGBENCH_CASES" ]]; then
  echo "router benchmark: pgbench on loopback, ${SECONDS_PER_RUN}s per run (PgBouncer and router: mean of 2 runs, A B B A), transaction pooling, 20 server connections per tenant"
  echo "CPU per transaction: the pooler's threads' time on a CPU (/proc/<pid>/task/*/schedstat, user + system) over the run, divided by pgbench's transactions"
  printf '  %-34s %12s %12s %12s %10s\n' case direct pgbouncer router router/pgb
else
  echo "router benchmark"
fi
for c in $PGBENCH_CASES; do
  read -r d_tps d_lat d_runs _ <<<"$(summary "${RESULT[direct,$c]}")"
  read -r b_tps b_lat b_runs b_cpu b_cs <<<"$(summary "${RESULT[pgbouncer,$c]}")"
  read -r r_tps r_lat r_runs r_cpu r_cs <<<"$(summary "${RESULT[router,$c]}")"
  echo "  $(case_name "$c")"
  printf '  %-34s %12.0f %12.0f %12.0f %10s\n' "  tps" "$d_tps" "$b_tps" "$r_tps" "$(ratio "$r_tps" "$b_tps")"
  printf '  %-34s %12s %12s %12s\n' "  each run's tps" "$d_runs" "$b_runs" "$r_runs"
  if [[ "$c" == single ]]; then
    # One client: the mean latency is the inverse of the TPS, finer than pgbench's "x.xxx ms".
    read -r d_us b_us r_us <<<"$(python3 -c "print(*(f'{1e6 / t:.1f}' for t in ($d_tps, $b_tps, $r_tps)))")"
    printf '  %-34s %12s %12s %12s\n' "  mean latency (us)" "$d_us" "$b_us" "$r_us"
    printf '  %-34s %12s %12s %12s\n' "  overhead over direct (us)" "" \
      "$(python3 -c "print(f'{$b_us - $d_us:.1f}')")" "$(python3 -c "print(f'{$r_us - $d_us:.1f}')")"
  else
    printf '  %-34s %12s %12s %12s\n' "  mean latency (ms)" "$d_lat" "$b_lat" "$r_lat"
  fi
  printf '  %-34s %12s %12s %12s %10s\n' "  CPU per transaction (us)" "" "$b_cpu" "$r_cpu" "$(ratio "$r_cpu" "$b_cpu")"
  printf '  %-34s %12s %12s %12s %10s\n' "  context switches per transaction" "" "$b_cs" "$r_cs" "$(ratio "$r_cs" "$b_cs")"
  if [[ -n "$BASELINE" ]]; then
    read -r o_tps o_lat o_runs o_cpu o_cs <<<"$(summary "${RESULT[baseline,$c]}")"
    printf '  %-34s %12s %12s %12.0f %10s\n' "  baseline router: tps, runs" "" "" "$o_tps" "$o_runs"
    if [[ "$c" == single ]]; then
      printf '  %-34s %12s %12s %12s\n' "  baseline: overhead over direct (us)" "" "" \
        "$(python3 -c "print(f'{1e6 / $o_tps - $d_us:.1f}')")"
    fi
    printf '  %-34s %12s %12s %12s\n' "  baseline: CPU, switches per tx" "" "" "$o_cpu, $o_cs"
    printf '  %-34s %12s %12s %12s %10s\n' "  router/baseline: tps, CPU per tx" "" "" "" \
      "$(ratio "$r_tps" "$o_tps"), $(ratio "$r_cpu" "$o_cpu")"
  fi
done
if has_case idle; then
  echo "  router RSS with 10,000 idle tenants configured: $((IDLE_RSS_KB / 1024)) MiB (target <= 100 MiB)"
fi
if has_case ready; then echo "  $READY_LINE"; fi
if has_case fleet; then sed 's/^/  /' <<<"$FLEET_LINES"; fi
