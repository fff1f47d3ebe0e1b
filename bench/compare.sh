#!/usr/bin/env bash
# ringkv next to redis, in ONE run on the same machine (issue #7; ARCHITECTURE.md §9: only ratios measured
# side by side at the same moment mean anything on a shared 2-core machine).
#
#   bench/compare.sh                     # ~120 s of measuring in total
#   BENCH_SECONDS=40 bench/compare.sh    # shorter: the budget is split over all runs
#
# Builds release, makes certificates with ringkv-certs, starts one ringkv node and two
# redis-servers (plain: no persistence; durable: appendonly + appendfsync always), then for
# each scenario runs ringkv-bench --json and redis-benchmark --csv with the same clients, value
# size, operation and keyspace and prints one table. ringkv puts are always durable (fsync group
# commit), so they are compared with redis `appendfsync always`; gets with plain redis. If this
# redis is built with TLS, a mutual-TLS redis row is added (ringkv is always mTLS), using the
# same CA and certificates as ringkv.
#
# Environment:
#   BENCH_SECONDS   total measuring time of all runs (default 120); each run gets an equal share,
#                   at least 1 s. Build, preloads, warmups and redis calibration come on top.
#   BENCH_KEYSPACE  distinct keys (default 10000; ringkv-bench --keyspace, redis-benchmark -r)
#   BENCH_SCAN_KEYS keys loaded for the scan row (default 1000000; the scan also returns the
#                   keys the earlier rows wrote, and redis is loaded with as many)
#   BENCH_TMPDIR    where data, certs and logs go (default: target/, on the same disk as the
#                   work tree, because /tmp may be a tmpfs where fsync costs nothing)
#   BENCH_SKIP_BUILD=1  reuse target/release as it is
# Needs redis-server, redis-benchmark, redis-cli and jq; installs them with apt-get if missing.
# Holds /dev/cpu_dma_latency at 0 during the run (python3) when it may.
#
# The 3-node rows run two clusters side by side, replication 1 and replication 3 (explicit
# --replication-factor: the ECS's default is 3), measured one after the other for each
# scenario; a table of R=3 / R=1 ratios follows, with the node counters' mean group commit
# of the put runs (`ringkv-bench node-stats`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release
BENCH_SECONDS=${BENCH_SECONDS:-120}
KEYSPACE=${BENCH_KEYSPACE:-10000}
SCAN_KEYS=${BENCH_SCAN_KEYS:-1000000}
SIZES=(100 4096)
CLIENT_COUNTS=(50 1)
OPS=(get put)

say() { echo "compare: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# --- tools ---------------------------------------------------------------------------------------
install_missing() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-benchmark >/dev/null && command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v jq >/dev/null || missing+=(jq)
    [[ ${#missing[@]} -eq 0 ]] && return
    say "installing ${missing[*]} with apt-get"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# --- processes and cleanup ---------------------------------------------------------------------------
TMP=
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    [[ -n $TMP ]] && rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_until, hold_cpu_dma_latency
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# --- servers -----------------------------------------------------------------------------------------
start_ringkv() {
    RINGKV_PORT=$(free_port)
    RINGKV_ADDR=127.0.0.1:$RINGKV_PORT
    RUST_LOG=warn "$BIN/ringkv-node" --name n1 --listen "$RINGKV_ADDR" --start \
        --data-dir "$TMP/ringkv-n1" --certs "$TMP/certs" >"$TMP/ringkv-n1.log" 2>&1 &
    PIDS+=($!)
    wait_until 20 "ringkv-node" "$BIN/ringkv" --seed "$RINGKV_ADDR" --certs "$TMP/certs" ring
    say "ringkv-node n1 on $RINGKV_ADDR (data in $TMP/ringkv-n1)"
}

# A 3-node cluster: `ringkv-ecs serve --replication-factor R` and three `ringkv-node`
# processes (own certificate, port and data dir each), added to the ring through the ECS like
# an operator would. The factor is passed explicitly (the ECS's default is 3) and checked in
# the ECS's status, so a changed default cannot silently change what a row means. Sets
# CLUSTER_SEEDS (comma-separated) and CLUSTER_ECS. Redis stays one process: its multi-node
# equivalent would be a cluster with replicas, a different thing, so 3-node rows compare with
# the same redis.
start_ringkv_cluster() { # tag (node names <tag>1..3) replication-factor
    local tag=$1 rf=$2 ecs_port i port seeds=()
    ecs_port=$(free_port)
    # info: the ECS logs a failover ("failing over a silent node") at warn, and the table
    # says whether one happened during the run.
    RUST_LOG=ringkv_ecs=info NO_COLOR=1 "$BIN/ringkv-ecs" --certs "$TMP/certs" --identity ecs serve \
        --listen "127.0.0.1:$ecs_port" --state-dir "$TMP/ecs-$tag-state" \
        --replication-factor "$rf" >"$TMP/ecs-$tag.log" 2>&1 &
    PIDS+=($!)
    for i in 1 2 3; do
        port=$(free_port)
        RUST_LOG=warn "$BIN/ringkv-node" --name "$tag$i" --listen "127.0.0.1:$port" \
            --data-dir "$TMP/ringkv3-$tag$i" --certs "$TMP/certs" >"$TMP/ringkv3-$tag$i.log" 2>&1 &
        PIDS+=($!)
        seeds+=("127.0.0.1:$port")
    done
    wait_until 20 "ringkv-ecs ($tag)" "$BIN/ringkv-ecs" --ecs "127.0.0.1:$ecs_port" --certs "$TMP/certs" ring
    sleep 1 # the nodes bind their sockets at once; give them a moment before the ECS dials
    for i in 1 2 3; do
        "$BIN/ringkv-ecs" --ecs "127.0.0.1:$ecs_port" --certs "$TMP/certs" \
            add-node --name "$tag$i" --addr "${seeds[$((i - 1))]}" >>"$TMP/ecs-$tag.log" ||
            die "adding $tag$i failed (see $TMP/ecs-$tag.log)"
    done
    local copies
    copies=$("$BIN/ringkv-ecs" --ecs "127.0.0.1:$ecs_port" --certs "$TMP/certs" status |
        sed -n 's/^replicas: \([0-9]*\) copies.*/\1/p')
    [[ $copies == "$rf" ]] || die "cluster $tag: asked for replication $rf, its ECS reports ${copies:-nothing}"
    CLUSTER_SEEDS=$(IFS=,; echo "${seeds[*]}")
    CLUSTER_ECS=127.0.0.1:$ecs_port
    say "3-node cluster ${tag}1..${tag}3 (R=$rf) on $CLUSTER_SEEDS, ECS on $CLUSTER_ECS"
}

REDIS_TLS=0
REDIS_TLS_WHY=""
REDIS_TLS_CLIENT=()

# start_redis NAME extra-args...: sets REDIS_PORT and REDIS_TLS_PORT (0 without TLS).
start_redis() {
    local name=$1 port tls_port=0 dir=$TMP/redis-$1
    shift
    port=$(free_port)
    mkdir -p "$dir"
    local tls=()
    if [[ $REDIS_TLS == 1 ]]; then
        tls_port=$(free_port)
        # Mutual TLS like ringkv: tls-auth-clients defaults to yes.
        tls=(--tls-port "$tls_port" --tls-cert-file "$TMP/certs/n1.pem"
            --tls-key-file "$TMP/certs/n1.key" --tls-ca-cert-file "$TMP/certs/ca.pem")
    fi
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --daemonize no \
        --logfile "$dir/redis.log" "${tls[@]}" "$@" &
    PIDS+=($!)
    wait_until 10 "redis-server ($name)" redis-cli -p "$port" ping
    REDIS_PORT=$port
    REDIS_TLS_PORT=$tls_port
    local tls_note=""
    [[ $REDIS_TLS == 1 ]] && tls_note=" and mTLS on :$tls_port"
    say "redis-server $name on 127.0.0.1:$port$tls_note ($*)"
}

# Whether this redis can do TLS, and cheaply: reuse ringkv's CA and node/client certificates.
probe_redis_tls() {
    if ! redis-benchmark --help 2>&1 | grep -q -- '--tls'; then
        REDIS_TLS_WHY="redis-benchmark has no --tls (redis built without TLS)"
        return
    fi
    # The server's TLS support shows by starting it with TLS options.
    local port tls_port dir=$TMP/redis-tls-probe
    port=$(free_port)
    tls_port=$(free_port)
    mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save '' --daemonize no \
        --logfile "$dir/redis.log" --tls-port "$tls_port" --tls-cert-file "$TMP/certs/n1.pem" \
        --tls-key-file "$TMP/certs/n1.key" --tls-ca-cert-file "$TMP/certs/ca.pem" &
    local pid=$!
    PIDS+=("$pid")
    REDIS_TLS_CLIENT=(--tls --cert "$TMP/certs/client.pem" --key "$TMP/certs/client.key"
        --cacert "$TMP/certs/ca.pem")
    local deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            REDIS_TLS_WHY="redis-server refused the TLS options: $(tail -n 1 "$dir/redis.log")"
            return
        fi
        if [[ $(redis-cli -p "$tls_port" "${REDIS_TLS_CLIENT[@]}" ping 2>/dev/null) == PONG ]]; then
            REDIS_TLS=1
            break
        fi
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    PIDS=("${PIDS[@]/$pid/}")
    [[ $REDIS_TLS == 1 ]] || REDIS_TLS_WHY="no TLS PING answer within 5 s (see $dir/redis.log)"
}

# Puts key:000000000000 .. key:<KEYSPACE-1> with SIZE-byte values into redis, so GETs hit.
preload_redis() { # port size
    awk -v n="$KEYSPACE" -v d="$2" 'BEGIN {
        v = sprintf("%*s", d, ""); gsub(/ /, "x", v)
        for (i = 0; i < n; i++) {
            k = sprintf("key:%012d", i)
            printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, d, v
        }
    }' | redis-cli -p "$1" --pipe >/dev/null
}

# --- one measurement each: prints "ops/s p50_us p99_us note" -------------------------------------------
run_ringkv() { # clients size op seconds [seeds]
    local ratio=1:0 out
    [[ $3 == put ]] && ratio=0:1
    out=$("$BIN/ringkv-bench" --seed "${5:-$RINGKV_ADDR}" --certs "$TMP/certs" --clients "$1" \
        --value-size "$2" --ratio "$ratio" --duration "$4" --warmup 1 --keyspace "$KEYSPACE" \
        --seed-rng 1 --json 2>>"$TMP/ringkv-bench.log") || die "ringkv-bench failed (see $TMP/ringkv-bench.log)"
    jq -r --arg op "$3" '[(.[$op].ops_per_sec | round), (.[$op].latency_us.p50 // "-"), (.[$op].latency_us.p99 // "-"),
        (if (.errors | length) > 0 then "ERRORS:" + (.errors | map_values(.count) | tostring) else "" end)]
        | map(tostring) | join(" ")' <<<"$out"
}

# redis-benchmark --csv: rps and (redis >= 7) latency columns in ms, found by header name.
parse_redis_csv() {
    awk -F, '{ gsub(/"/, "") }
        NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
        NF > 1 {
            p50 = ("p50_latency_ms" in col) ? sprintf("%.0f", $col["p50_latency_ms"] * 1000) : "-"
            p99 = ("p99_latency_ms" in col) ? sprintf("%.0f", $col["p99_latency_ms"] * 1000) : "-"
            printf "%.0f %s %s\n", $col["rps"], p50, p99
        }'
}

run_redis() { # port clients size op seconds tls(0/1)
    local port=$1 clients=$2 size=$3 command=get seconds=$5 tls=() n rps
    [[ $4 == put ]] && command="set"
    [[ $6 == 1 ]] && tls=("${REDIS_TLS_CLIENT[@]}")
    local common=(-h 127.0.0.1 -p "$port" -c "$clients" -d "$size" -r "$KEYSPACE" -t "$command" --csv "${tls[@]}")
    # redis-benchmark counts requests, not seconds: a short calibration run (which also warms
    # up) sizes -n to take about $seconds.
    n=$((clients == 1 ? 2000 : 20000))
    rps=$(redis-benchmark "${common[@]}" -n "$n" 2>/dev/null | parse_redis_csv | awk '{print $1}')
    [[ -n $rps ]] || die "redis-benchmark calibration on port $port printed nothing"
    n=$(awk -v r="$rps" -v s="$seconds" -v m="$n" 'BEGIN { n = int(r * s); print (n > m ? n : m) }')
    redis-benchmark "${common[@]}" -n "$n" 2>/dev/null | parse_redis_csv | awk '{print $1, $2, $3, ""}'
}

# The application API on the standalone node (100 B values): ringkv-bench with extra
# arguments (--batch, --cas). Prints "keys/s p50_us p99_us note": keys per second (ops/s x
# keys per request), latencies per request.
run_ringkv_api() { # clients op seconds extra-args...
    local clients=$1 op=$2 seconds=$3 ratio=1:0 out
    shift 3
    [[ $op == put ]] && ratio=0:1
    out=$("$BIN/ringkv-bench" --seed "$RINGKV_ADDR" --certs "$TMP/certs" --clients "$clients" \
        --value-size 100 --ratio "$ratio" --duration "$seconds" --warmup 1 --keyspace "$KEYSPACE" \
        --seed-rng 1 --json "$@" 2>>"$TMP/ringkv-bench.log") || die "ringkv-bench $* failed (see $TMP/ringkv-bench.log)"
    jq -r --arg op "$op" '[(.keys_per_sec | round), (.[$op].latency_us.p50 // "-"), (.[$op].latency_us.p99 // "-"),
        (if (.errors | length) > 0 then "ERRORS:" + (.errors | map_values(.count) | tostring)
         elif .[$op].misses > 0 and .config.cas then "CONFLICTS:\(.[$op].misses)" else "" end)]
        | map(tostring) | join(" ")' <<<"$out"
}

# redis-benchmark of one custom command (its arguments may hold __rand_int__, each replaced
# by a random key number below the keyspace). Prints "keys/s p50_us p99_us": commands/s x
# keys per command.
run_redis_command() { # port clients seconds keys-per-command command...
    local port=$1 clients=$2 seconds=$3 keys=$4 n rps
    shift 4
    local common=(-h 127.0.0.1 -p "$port" -c "$clients" -r "$KEYSPACE" --csv)
    n=2000
    rps=$(redis-benchmark "${common[@]}" -n "$n" "$@" 2>/dev/null | parse_redis_csv | awk '{print $1}')
    [[ -n $rps ]] || die "redis-benchmark $1 calibration on port $port printed nothing"
    n=$(awk -v r="$rps" -v s="$seconds" -v m="$n" 'BEGIN { n = int(r * s); print (n > m ? n : m) }')
    redis-benchmark "${common[@]}" -n "$n" "$@" 2>/dev/null | parse_redis_csv |
        awk -v k="$keys" '{printf "%.0f %s %s\n", $1 * k, $2, $3}'
}

# --- table ---------------------------------------------------------------------------------------------
ROWS=()
row() { ROWS+=("$(printf '%s|' "$@")"); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

table_line() { printf '%-26s %-7s %-40s %10s %8s %8s %13s %s\n' "$@"; }

print_table() {
    table_line scenario system "config (durability)" "ops/s" "p50 us" "p99 us" "ringkv/redis" ""
    printf '%.0s-' {1..122}
    echo
    local r
    for r in "${ROWS[@]}"; do
        IFS='|' read -r -a f <<<"$r"
        table_line "${f[@]:0:8}"
    done
}

# R=1 vs R=3 of each 3-node scenario: "scenario|ops p50 p99 (R=1)|ops p50 p99 (R=3)".
REPL_ROWS=()
print_replication_table() {
    echo "replication cost, 3 nodes, measured back to back in this run (ratio = R=3 / R=1):"
    local fmt='%-16s %10s %10s %6s %8s %8s %6s %8s %8s %6s\n'
    # shellcheck disable=SC2059
    printf "$fmt" scenario "R=1 ops/s" "R=3 ops/s" ratio "R=1 p50" "R=3 p50" ratio "R=1 p99" "R=3 p99" ratio
    local r name a b o1 p1 q1 o3 p3 q3
    for r in "${REPL_ROWS[@]}"; do
        IFS='|' read -r name a b <<<"$r"
        read -r o1 p1 q1 <<<"$a"
        read -r o3 p3 q3 <<<"$b"
        # shellcheck disable=SC2059
        printf "$fmt" "$name" "$o1" "$o3" "$(ratio "$o3" "$o1")" "$p1" "$p3" "$(ratio "$p3" "$p1")" \
            "$q1" "$q3" "$(ratio "$q3" "$q1")"
    done
}

# Every node's counters (JSON from `ringkv-bench node-stats`), or {} if the ECS did not answer.
node_stats() { # ecs-addr
    "$BIN/ringkv-bench" node-stats --ecs "$1" --certs "$TMP/certs" 2>>"$TMP/ringkv-bench.log" || echo '{}'
}

# "name: node writes/commits = mean group, ..." from two node_stats snapshots.
COMMIT_NOTES=()
commit_note() { # name before-json after-json
    COMMIT_NOTES+=("$1: $(jq -rn --argjson b "$2" --argjson a "$3" '
        [$a.nodes // {} | to_entries[] | .key as $n
         | ((.value.writes // 0) - ($b.nodes[$n].writes // 0)) as $w
         | ((.value.write_commits // 0) - ($b.nodes[$n].write_commits // 0)) as $c
         | "\($n) \($w)/\($c) = \(if $c > 0 then ($w / $c * 10 | round / 10) else "-" end)"]
        | join(", ")')")
}

# --- main ----------------------------------------------------------------------------------------------
# One ringkv row of a 3-node scenario: the cluster of replication factor $1 (its ECS $2,
# seeds $3), with the caller's name, kconf, clients, op and per_run; its group commits for
# puts. Sets LAST_RESULT to "ops p50 p99".
run_ringkv_3nodes() { # replication ecs seeds
    local before after k_ops k_p50 k_p99 k_note
    say "$name: ringkv R=$1"
    before=$(node_stats "$2")
    read -r k_ops k_p50 k_p99 k_note <<<"$(run_ringkv "$clients" 100 "$op" "$per_run" "$3")"
    [[ -n $k_ops ]] || die "no ringkv R=$1 result for $name"
    after=$(node_stats "$2")
    LAST_RESULT="$k_ops $k_p50 $k_p99"
    row "$name R=$1" ringkv "R=$1, $kconf" "$k_ops" "$k_p50" "$k_p99" "-" "${k_note:-}"
    if [[ $op == put ]]; then
        commit_note "$name R=$1" "$before" "$after"
    fi
}

main() {
    install_missing
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        say "building release"
        (cd "$ROOT" && cargo build --release --bins --examples)
    fi
    local base=${BENCH_TMPDIR:-$ROOT/target}
    mkdir -p "$base"
    TMP=$(mktemp -d "$base/compare.XXXXXX")

    "$BIN/ringkv-certs" init --dir "$TMP/certs" >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role node --name n1 --san 127.0.0.1 --san localhost >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role client --name client >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role ecs --name ecs --san 127.0.0.1 >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role admin --name admin >/dev/null
    local i
    for i in 1 2 3; do
        "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role node --name "r1n$i" --san 127.0.0.1 >/dev/null
        "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role node --name "r3n$i" --san 127.0.0.1 >/dev/null
    done

    hold_cpu_dma_latency
    probe_redis_tls
    [[ $REDIS_TLS == 1 ]] || say "skipped: redis mTLS rows ($REDIS_TLS_WHY)"
    start_ringkv
    start_redis plain --appendonly no
    local plain_port=$REDIS_PORT plain_tls_port=$REDIS_TLS_PORT
    start_redis durable --appendonly yes --appendfsync always
    local durable_port=$REDIS_PORT durable_tls_port=$REDIS_TLS_PORT
    # Both 3-node clusters run from here on (idle but for the ECS's probes while the
    # other is measured); only one system is measured at a time.
    start_ringkv_cluster r1n 1
    local r1_seeds=$CLUSTER_SEEDS r1_ecs=$CLUSTER_ECS
    start_ringkv_cluster r3n 3
    local r3_seeds=$CLUSTER_SEEDS r3_ecs=$CLUSTER_ECS

    local systems=$((2 + REDIS_TLS))
    local scenarios=$((${#SIZES[@]} * ${#CLIENT_COUNTS[@]} * ${#OPS[@]}))
    # 3-node scenarios: 100 B, every client count, both operations; R=1, R=3 and redis each.
    local scenarios3=$((${#CLIENT_COUNTS[@]} * ${#OPS[@]}))
    # Application API: batches of 100 keys (put, get) and compare-and-set; ringkv and redis.
    local api=3
    local runs=$((scenarios * systems + scenarios3 * 3 + api * 2))
    local per_run
    per_run=$(awk -v t="$BENCH_SECONDS" -v n=$runs \
        'BEGIN { s = t / n; printf "%.1f", (s < 1 ? 1 : s) }')
    say "$runs runs ($scenarios 1-node scenarios x $systems systems, $scenarios3 3-node scenarios x 3), $per_run s each (BENCH_SECONDS=$BENCH_SECONDS)"

    local size clients op
    for size in "${SIZES[@]}"; do
        preload_redis "$plain_port" "$size"
        for clients in "${CLIENT_COUNTS[@]}"; do
            for op in "${OPS[@]}"; do
                local name="$op ${size}B c=$clients 1node R=1"
                local port=$plain_port tls_port=$plain_tls_port rconf="no persistence"
                local kconf="1 QUIC conn, mTLS"
                if [[ $op == put ]]; then
                    port=$durable_port tls_port=$durable_tls_port rconf="appendfsync always"
                    kconf="fsync group commit, mTLS"
                fi
                local k_ops k_p50 k_p99 k_note r_ops r_p50 r_p99 t_ops t_p50 t_p99
                say "$name: ringkv"
                read -r k_ops k_p50 k_p99 k_note <<<"$(run_ringkv "$clients" "$size" "$op" "$per_run")"
                [[ -n $k_ops ]] || die "no ringkv result for $name"
                say "$name: redis ($rconf)"
                read -r r_ops r_p50 r_p99 _ <<<"$(run_redis "$port" "$clients" "$size" "$op" "$per_run" 0)"
                [[ -n $r_ops ]] || die "no redis result for $name"
                row "$name" ringkv "$kconf" "$k_ops" "$k_p50" "$k_p99" "-" "${k_note:-}"
                row "" redis "$rconf" "$r_ops" "$r_p50" "$r_p99" "$(ratio "$k_ops" "$r_ops")" ""
                if [[ $REDIS_TLS == 1 ]]; then
                    say "$name: redis (mTLS, $rconf)"
                    read -r t_ops t_p50 t_p99 _ <<<"$(run_redis "$tls_port" "$clients" "$size" "$op" "$per_run" 1)"
                    [[ -n $t_ops ]] || die "no redis mTLS result for $name"
                    row "" redis "mTLS, $rconf" "$t_ops" "$t_p50" "$t_p99" "$(ratio "$k_ops" "$t_ops")" ""
                fi
            done
        done
    done

    # The application API, 50 clients, 100 B values, on the standalone node: put_many /
    # get_many of 100 random keys per request against MSET / MGET of 100 keys per command
    # (redis: durable for writes, plain for reads, as above), and compare-and-set (each
    # client increments its own key with put_if_version) against a Lua CAS (GET, compare,
    # SET) on durable redis. Throughput in keys/s; latencies per request / command.
    preload_redis "$plain_port" 100
    preload_redis "$durable_port" 100
    local hundred=() pairs=() x100
    x100=$(printf 'x%.0s' {1..100})
    for i in $(seq 1 100); do
        hundred+=("key:__rand_int__")
        pairs+=("key:__rand_int__" "$x100")
    done
    local k_keys r_keys
    say "mput 100x100B c=50: ringkv"
    read -r k_keys k_p50 k_p99 k_note <<<"$(run_ringkv_api 50 put "$per_run" --batch 100)"
    say "mput 100x100B c=50: redis MSET (appendfsync always)"
    read -r r_keys r_p50 r_p99 <<<"$(run_redis_command "$durable_port" 50 "$per_run" 100 MSET "${pairs[@]}")"
    row "mput 100x100B c=50 keys/s" ringkv "put_many of 100, fsync group commit" "$k_keys" "$k_p50" "$k_p99" "-" "${k_note:-}"
    row "" redis "MSET of 100, appendfsync always" "$r_keys" "$r_p50" "$r_p99" "$(ratio "$k_keys" "$r_keys")" ""
    say "mget 100x100B c=50: ringkv"
    read -r k_keys k_p50 k_p99 k_note <<<"$(run_ringkv_api 50 get "$per_run" --batch 100)"
    say "mget 100x100B c=50: redis MGET (no persistence)"
    read -r r_keys r_p50 r_p99 <<<"$(run_redis_command "$plain_port" 50 "$per_run" 100 MGET "${hundred[@]}")"
    row "mget 100x100B c=50 keys/s" ringkv "get_many of 100, mTLS" "$k_keys" "$k_p50" "$k_p99" "-" "${k_note:-}"
    row "" redis "MGET of 100, no persistence" "$r_keys" "$r_p50" "$r_p99" "$(ratio "$k_keys" "$r_keys")" ""
    say "cas 100B c=50: ringkv"
    read -r k_keys k_p50 k_p99 k_note <<<"$(run_ringkv_api 50 put "$per_run" --cas)"
    say "cas 100B c=50: redis Lua CAS (appendfsync always)"
    # Loaded once and run by its SHA (the script's commas would split redis-benchmark's CSV
    # test name). Every key holds the 100 x's the preload put, so each call sets it again.
    local sha
    sha=$(redis-cli -p "$durable_port" SCRIPT LOAD \
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[1]) end return 0")
    read -r r_keys r_p50 r_p99 <<<"$(run_redis_command "$durable_port" 50 "$per_run" 1 EVALSHA "$sha" 1 "key:__rand_int__" "$x100")"
    row "cas 100B c=50" ringkv "put_if_version, fsync group commit" "$k_keys" "$k_p50" "$k_p99" "-" "${k_note:-}"
    row "" redis "Lua GET+compare+SET, appendfsync always" "$r_keys" "$r_p50" "$r_p99" "$(ratio "$k_keys" "$r_keys")" ""

    # A full scan, keys only, pages of 1,000 keys, one client: ringkv-bench scan over the
    # standalone node after loading $SCAN_KEYS more keys, against SCAN ... COUNT 1000, cursor
    # after cursor (bench/redis_scan.py: redis-cli --scan has no --count before 7.2), over
    # database 1 of the plain redis, loaded with as many keys as the ringkv scan returned.
    # keys/s of the whole scan; latencies per page.
    say "scan: loading $SCAN_KEYS keys into ringkv"
    local scan_out scanned k_secs
    scan_out=$("$BIN/ringkv-bench" scan --seed "$RINGKV_ADDR" --certs "$TMP/certs" --load "$SCAN_KEYS" \
        --page 1000 2>>"$TMP/ringkv-bench.log") || die "ringkv-bench scan failed (see $TMP/ringkv-bench.log)"
    read -r scanned k_keys k_p50 k_p99 <<<"$(jq -r '[.keys, (.keys_per_sec | round), .page_latency_us.p50, .page_latency_us.p99] | map(tostring) | join(" ")' <<<"$scan_out")"
    say "scan: loading $scanned keys into redis db 1"
    awk -v n="$scanned" 'BEGIN {
        for (i = 0; i < n; i++) {
            k = sprintf("scan:%012d", i)
            printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\nxxx\r\n", length(k), k
        }
    }' | redis-cli -p "$plain_port" -n 1 --pipe >/dev/null
    say "scan: redis"
    local r_count r_secs
    read -r r_count r_secs r_p50 r_p99 <<<"$(python3 "$ROOT/bench/redis_scan.py" "$plain_port" 1 1000)"
    r_keys=$(awk -v n="$r_count" -v s="$r_secs" 'BEGIN { printf "%.0f", n / s }')
    k_secs=$(jq -r '.seconds' <<<"$scan_out")
    row "scan ${scanned} keys keys/s" ringkv "scan, pages of 1000, 1 client, mTLS" "$k_keys" "$k_p50" "$k_p99" "-" "${k_secs} s"
    row "" redis "SCAN COUNT 1000, no persistence" "$r_keys" "$r_p50" "$r_p99" "$(ratio "$k_keys" "$r_keys")" "$r_count keys, ${r_secs} s"
    redis-cli -p "$plain_port" -n 1 FLUSHDB >/dev/null

    # 3 nodes on the same 2 cores, replication 1 and 3 back to back: 100 B, against the same
    # redis servers (plain redis holds 100 B values again: the API section preloaded them
    # over the 4 KiB ones the first loop left).
    local r1 r3
    for clients in "${CLIENT_COUNTS[@]}"; do
        for op in "${OPS[@]}"; do
            local name="$op 100B c=$clients 3nodes" port=$plain_port rconf="no persistence"
            local kconf="3 nodes, mTLS"
            if [[ $op == put ]]; then
                port=$durable_port rconf="appendfsync always" kconf="3 nodes, fsync group commit, mTLS"
            fi
            run_ringkv_3nodes 1 "$r1_ecs" "$r1_seeds"
            r1=$LAST_RESULT
            run_ringkv_3nodes 3 "$r3_ecs" "$r3_seeds"
            r3=$LAST_RESULT
            say "$name: redis ($rconf)"
            read -r r_ops r_p50 r_p99 _ <<<"$(run_redis "$port" "$clients" 100 "$op" "$per_run" 0)"
            [[ -n $r_ops ]] || die "no redis result for $name"
            row "" redis "$rconf" "$r_ops" "$r_p50" "$r_p99" \
                "$(ratio "${r1%% *}" "$r_ops") / $(ratio "${r3%% *}" "$r_ops")" ""
            REPL_ROWS+=("$op 100B c=$clients|$r1|$r3")
        done
    done

    echo
    echo "ringkv vs redis on $(nproc) cores, $(uname -r), data on $(df -PT "$TMP" | awk 'NR == 2 { print $2 }');" \
        "$per_run s per run, keyspace $KEYSPACE, $(redis-server --version | awk '{print $3}')"
    echo "ringkv/redis = ringkv ops/s / that redis row's ops/s; latencies in µs (redis: its ms figures x1000)"
    echo "R=1 / R=3: the ring's replication factor (1node: a standalone node, always 1); in the 3-node"
    echo "sections the redis row's ratio is R=1 row / redis and R=3 row / redis"
    print_table
    [[ $REDIS_TLS == 1 ]] || echo "redis mTLS rows skipped: $REDIS_TLS_WHY"
    echo
    print_replication_table
    echo
    echo "group commits of the 3-node put runs (node counters writes / write_commits over the run, per node):"
    local n
    for n in "${COMMIT_NOTES[@]}"; do echo "  $n"; done
    local failovers
    failovers=$(grep -h "failing over\|node marked failed" "$TMP"/ecs-r1n.log "$TMP"/ecs-r3n.log 2>/dev/null || true)
    if [[ -n $failovers ]]; then
        echo "WARNING: an ECS failed a node over during the run (its rows are suspect):"
        echo "$failovers"
    else
        echo "no failover during the run (ECS logs checked)"
    fi
}

main "$@"
