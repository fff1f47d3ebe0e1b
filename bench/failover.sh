#!/usr/bin/env bash
# Failover and rebuild of a replicated ringkv cluster, in one run on this machine.
#
#   bench/failover.sh                        # 3 failover rounds, then the rebuild of ~100 MB
#   FAILOVER_ROUNDS=1 REBUILD_KEYS=25000 REBUILD_VALUE_SIZE=4096 bench/failover.sh
#
# Failover (each round on a fresh cluster): `ringkv-ecs serve --replication-factor 3
# --failover-after 3s` and 4 `ringkv-node`s; `ringkv-bench failover` starts writes at a light,
# open-loop rate (FAILOVER_RATE/s, 100 B values), SIGKILLs one node after 2 s and reports
# the time from the kill to the first successful write, started after the kill, of a key
# whose chain (before the kill) held the killed node: overall and by the node's role in
# that chain (head, middle, tail). The ECS's log adds when it began the failover and how
# long marking the node failed took.
#
# Rebuild: a fresh 4-node R=3 cluster is loaded with REBUILD_KEYS values of
# REBUILD_VALUE_SIZE bytes (every node holds 3/4 of them), one node is SIGKILLed, and the
# ECS's log gives the rebuild time: the `remove_failed` change, from "node marked failed"
# to "failed node replaced and removed" (both log the time since the failover began). The
# bytes rebuilt are counted from the survivors' key counts before and after
# (keys gained x (key + value bytes)); MB/s = those bytes / the rebuild time, beside the disk's
# rate in the same run (dd, DISK_MIB MiB, conv=fdatasync).
#
# Environment:
#   FAILOVER_ROUNDS     failover rounds (default 3)
#   FAILOVER_AFTER      the ECS's --failover-after (default 3s, its default)
#   FAILOVER_RATE       writes started per second during a failover round (default 200)
#   REBUILD_KEYS        keys loaded before the rebuild (default 100000; 0 skips it)
#   REBUILD_VALUE_SIZE  their value size (default 1024)
#   DISK_MIB            MiB dd writes (then one fdatasync) to measure the disk in the same run
#   BENCH_TMPDIR        where data, certs and logs go (default: target/, a real disk)
#   BENCH_SKIP_BUILD=1  reuse target/release as it is
#   BENCH_KEEP=1        keep the data and logs directory
# Needs jq and python3.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/target/release
ROUNDS=${FAILOVER_ROUNDS:-3}
FAILOVER_AFTER=${FAILOVER_AFTER:-3s}
RATE=${FAILOVER_RATE:-200}
REBUILD_KEYS=${REBUILD_KEYS:-100000}
REBUILD_VALUE_SIZE=${REBUILD_VALUE_SIZE:-1024}
DISK_MIB=${DISK_MIB:-512}
KEY_BYTES=16 # key:000000000000

say() { echo "failover: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

TMP=
PIDS=()
HOLD_PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $TMP && ${BENCH_KEEP:-0} != 1 ]]; then
        rm -rf "$TMP"
    elif [[ -n $TMP ]]; then
        say "kept $TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_until, hold_cpu_dma_latency
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# start_cluster TAG: an ECS (R=3) and 4 nodes <TAG>1..4, all added. Sets ECS, SEEDS,
# NODE_PIDS (by index 1..4) and ECS_LOG.
declare -a NODE_PIDS NODE_ADDRS
start_cluster() {
    local tag=$1 i port dir=$TMP/$1
    mkdir -p "$dir"
    port=$(free_port)
    ECS=127.0.0.1:$port
    ECS_LOG=$dir/ecs.log
    RUST_LOG=ringkv_ecs=info NO_COLOR=1 "$BIN/ringkv-ecs" --certs "$TMP/certs" --identity ecs serve \
        --listen "$ECS" --state-dir "$dir/ecs-state" --replication-factor 3 \
        --failover-after "$FAILOVER_AFTER" >"$ECS_LOG" 2>&1 &
    PIDS+=($!)
    NODE_PIDS=()
    NODE_ADDRS=()
    for i in 1 2 3 4; do
        port=$(free_port)
        NODE_ADDRS[i]=127.0.0.1:$port
        RUST_LOG=warn NO_COLOR=1 "$BIN/ringkv-node" --name "$tag$i" --listen "${NODE_ADDRS[i]}" \
            --data-dir "$dir/$tag$i" --certs "$TMP/certs" >"$dir/$tag$i.log" 2>&1 &
        NODE_PIDS[i]=$!
        PIDS+=($!)
    done
    wait_until 20 "ringkv-ecs" "$BIN/ringkv-ecs" --ecs "$ECS" --certs "$TMP/certs" ring
    sleep 1
    for i in 1 2 3 4; do
        "$BIN/ringkv-ecs" --ecs "$ECS" --certs "$TMP/certs" add-node --name "$tag$i" \
            --addr "${NODE_ADDRS[i]}" >>"$dir/add-node.log" 2>&1 || die "adding $tag$i failed (see $dir)"
    done
    SEEDS=$(IFS=,; echo "${NODE_ADDRS[*]}")
    local copies
    copies=$("$BIN/ringkv-ecs" --ecs "$ECS" --certs "$TMP/certs" status |
        sed -n 's/^replicas: \([0-9]*\) copies.*/\1/p')
    [[ $copies == 3 ]] || die "cluster $tag: expected 3 copies of every key, the ECS reports ${copies:-nothing}"
    say "cluster $tag: ECS $ECS (R=3, failover after $FAILOVER_AFTER), nodes $SEEDS"
}

stop_cluster() {
    local pid
    for pid in "${NODE_PIDS[@]}" "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=("${HOLD_PIDS[@]}")
}

# The ECS log's failover events for NODE as JSON: UTC epoch seconds of the kill given, and
# of the events, and the durations they log.
parse_ecs_log() { # log node kill-epoch
    python3 - "$@" <<'EOF'
import json, re, sys
from datetime import datetime
log, node, kill = sys.argv[1], sys.argv[2], float(sys.argv[3])
ansi = re.compile(r"\x1b\[[0-9;]*m")
def dur(s):
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", s)
    if not m:
        return None
    return float(m.group(1)) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
def stamp(line):
    t = line.split()[0]
    t = re.sub(r"(\.\d{6})\d*", r"\1", t).replace("Z", "+00:00")
    return datetime.fromisoformat(t).timestamp()
out = {"transfers": []}
for raw in open(log, encoding="utf-8", errors="replace"):
    line = ansi.sub("", raw).rstrip()
    if not line[:1].isdigit():
        continue
    el = re.search(r"elapsed=(\S+)", line)
    el = dur(el.group(1)) if el else None
    if re.search(r"failing over (a )?silent nodes?", line) and node in line and "detect" not in out:
        out["detect"] = stamp(line) - kill
    elif re.search(r"nodes? marked failed", line) and node in line:
        out["marked_failed"] = el
        out["marked_failed_at"] = stamp(line) - kill
    elif "failed node replaced and removed" in line and node in line:
        out["replaced"] = el
        out["replaced_at"] = stamp(line) - kill
    elif " step" in line and "transfer" in line and "marked_failed" in out and "replaced" not in out:
        step = re.search(r'step=(.*?) elapsed=', line)
        out["transfers"].append({"step": step.group(1) if step else line, "s": el})
print(json.dumps(out))
EOF
}

secs() { jq -rn --argjson v "${1:-null}" 'if $v == null then "-" else ($v * 1000 | round | tostring) + " ms" end'; }

# --- failover rounds ---------------------------------------------------------------------------------
FAILOVER_LINES=()
failover_round() { # round
    local r=$1 tag="f$1" victim_i report kill_epoch events
    start_cluster "$tag"
    victim_i=$((1 + (r - 1) % 4))
    local victim=$tag$victim_i
    say "round $r: killing $victim (pid ${NODE_PIDS[victim_i]}) under $RATE writes/s"
    report=$("$BIN/ringkv-bench" failover --seed "$SEEDS" --certs "$TMP/certs" --victim "$victim" \
        --kill-pid "${NODE_PIDS[victim_i]}" --rate "$RATE" --before 2 --after 1 --json \
        --records "$TMP/$tag/writes.csv" \
        2>>"$TMP/$tag/bench.log") || die "ringkv-bench failover failed (see $TMP/$tag/bench.log)"
    echo "$report" >"$TMP/$tag/report.json"
    # The bench's own clock times the writes; the ECS's events are placed against the wall
    # clock time of the kill it reports.
    kill_epoch=$(jq -r .killed_at_unix <<<"$report")
    # Let the ECS finish the rebuild (small) so that its log has the whole failover.
    local deadline=$((SECONDS + 60))
    until grep -q "failed node replaced and removed" "$ECS_LOG" || ((SECONDS > deadline)); do sleep 0.2; done
    events=$(parse_ecs_log "$ECS_LOG" "$victim" "$kill_epoch")
    echo "round $r: $victim killed"
    jq -r '"  first successful write to an affected key: \(.failover_ms // "-") ms after the kill" +
        " (client saw the new ring after \(.client_saw_failover_ms // "-") ms)",
        (.by_role | to_entries[] | "  victim was \(.key | . + " " * (10 - length)): first ok \(.value.first_ok_after_kill_ms // "-") ms," +
            " writes started after kill \(.value.started_after_kill), max latency \(.value.max_latency_after_kill_ms // "-") ms," +
            " in-flight at kill done by \(.value.in_flight_at_kill_done_by_ms // "-") ms, errors \(.value.errors)"),
        "  writes \(.writes), skipped \(.skipped_starts), unfinished \(.unfinished), errors \(.errors | tostring)"' <<<"$report"
    jq -rn --argjson e "$events" 'def ms: if . == null then "-" else (. * 1000 | round | tostring) + " ms" end;
        "  ECS (wall clock): began failing over at +\($e.detect | ms); node marked failed \($e.marked_failed | ms)" +
        " after that; rebuild of the small data set done at +\($e.replaced_at | ms)"'
    FAILOVER_LINES+=("$r|$victim|$(jq -r '.failover_ms // "-"' <<<"$report")|$(jq -r '[.by_role.head.first_ok_after_kill_ms, .by_role.middle.first_ok_after_kill_ms, .by_role.tail.first_ok_after_kill_ms] | map(. // "-" | tostring) | join(" / ")' <<<"$report")|$(jq -r '.client_saw_failover_ms // "-"' <<<"$report")|$(jq -r '.detect // "-" | if type == "number" then (. * 1000 | round) else . end' <<<"$events")|$(jq -r '.marked_failed // "-" | if type == "number" then (. * 1000 | round) else . end' <<<"$events")")
    stop_cluster
}

# --- rebuild -------------------------------------------------------------------------------------------
REBUILD_LINES=()
rebuild_run() {
    local tag=g victim_i=2 victim before after kill_epoch events
    start_cluster "$tag"
    victim=$tag$victim_i
    say "loading $REBUILD_KEYS keys of $REBUILD_VALUE_SIZE B"
    local load_started=$SECONDS
    "$BIN/ringkv-bench" --seed "$SEEDS" --certs "$TMP/certs" --clients 1 --requests 1 --warmup 0 \
        --ratio 1:0 --keyspace "$REBUILD_KEYS" --value-size "$REBUILD_VALUE_SIZE" --json \
        >"$TMP/$tag/load.json" 2>"$TMP/$tag/load.log" || die "loading failed (see $TMP/$tag/load.log)"
    local load_line
    load_line=$(grep "preloaded" "$TMP/$tag/load.log" || true)
    say "${load_line:-loaded in $((SECONDS - load_started)) s}"
    before=$("$BIN/ringkv-bench" node-stats --ecs "$ECS" --certs "$TMP/certs")
    say "killing $victim (pid ${NODE_PIDS[victim_i]})"
    kill_epoch=$(date +%s.%N)
    kill -9 "${NODE_PIDS[victim_i]}"
    local deadline=$((SECONDS + 600))
    until grep -q "failed node replaced and removed" "$ECS_LOG"; do
        ((SECONDS < deadline)) || die "no rebuild within 600 s (see $ECS_LOG)"
        sleep 0.2
    done
    after=$("$BIN/ringkv-bench" node-stats --ecs "$ECS" --certs "$TMP/certs")
    events=$(parse_ecs_log "$ECS_LOG" "$victim" "$kill_epoch")
    echo "$before" >"$TMP/$tag/before.json"
    echo "$after" >"$TMP/$tag/after.json"
    echo "$events" >"$TMP/$tag/events.json"
    # The disk in the same run, as the issue's reference: DISK_MIB MiB, then one fdatasync.
    local disk
    disk=$(dd if=/dev/zero of="$TMP/disk-rate.tmp" bs=1M count="$DISK_MIB" conv=fdatasync 2>&1 |
        awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "s,") { print $1 / $(i - 1) / 1e6; exit } }')
    rm -f "$TMP/disk-rate.tmp"
    echo
    echo "rebuild: $REBUILD_KEYS keys x $REBUILD_VALUE_SIZE B in a 4-node R=3 cluster, $victim killed"
    echo "  ${load_line:-}"
    jq -rn --argjson b "$before" --argjson a "$after" --argjson e "$events" --arg victim "$victim" \
        --argjson kv $((KEY_BYTES + REBUILD_VALUE_SIZE)) --argjson disk "${disk:-0}" '
        def ms: if . == null then "-" else (. * 1000 | round | tostring) + " ms" end;
        ($b.nodes | to_entries | map("\(.key) \(.value.keys // "-")") | join(", ")) as $kb
        | ($a.nodes | to_entries | map("\(.key) \(.value.keys // "-")") | join(", ")) as $ka
        | ([$a.nodes | to_entries[] | select(.key != $victim) | (.value.keys // 0) - ($b.nodes[.key].keys // 0)] | add) as $gained
        | ($b.nodes[$victim].keys // 0) as $lost
        | ($e.replaced - $e.marked_failed) as $t
        | ($gained * $kv / 1e6) as $mb
        | "  keys before: \($kb) (ring version \($b.version))",
          "  keys after:  \($ka) (ring version \($a.version))",
          "  \($victim) held \($lost) keys; the survivors gained \($gained) keys = \($mb * 10 | round / 10) MB (keys x \($kv) B key+value)",
          "  ECS began failing over at +\($e.detect | ms) after the kill; node marked failed after \($e.marked_failed | ms) more;",
          "  rebuild (remove_failed: marked failed -> replaced and removed) took \($t | ms)",
          "  rebuild rate: \($mb | . * 10 | round / 10) MB / \($t * 100 | round / 100) s = \($mb / $t * 10 | round / 10) MB/s" +
            " (per copy received; \($lost * $kv / 1e6 / $t * 10 | round / 10) MB/s counted by the victim'"'"'s keys)",
          "  disk in the same run: \($disk | round) MB/s (dd bs=1M count='"$DISK_MIB"' conv=fdatasync); the rebuild ran at \(if $disk > 0 then ($mb / $t / $disk * 100 | round / 100 | tostring) + "x" else "-" end) that",
          "  transfer steps: \($e.transfers | length), \($e.transfers | map(.s) | add // 0 | . * 1000 | round) ms in total:",
          ($e.transfers[] | "    \(.s | ms)  \(.step)")'
    stop_cluster
}

main() {
    command -v jq >/dev/null || die "needs jq"
    command -v python3 >/dev/null || die "needs python3"
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        say "building release"
        (cd "$ROOT" && cargo build --release --bins)
    fi
    local base=${BENCH_TMPDIR:-$ROOT/target}
    mkdir -p "$base"
    TMP=$(mktemp -d "$base/failover.XXXXXX")
    "$BIN/ringkv-certs" init --dir "$TMP/certs" >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role client --name client >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role ecs --name ecs --san 127.0.0.1 >/dev/null
    "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role admin --name admin >/dev/null
    local r i
    for r in $(seq 1 "$ROUNDS") g; do
        [[ $r == g ]] || r=f$r
        for i in 1 2 3 4; do
            "$BIN/ringkv-certs" issue --dir "$TMP/certs" --role node --name "$r$i" --san 127.0.0.1 >/dev/null
        done
    done
    hold_cpu_dma_latency
    HOLD_PIDS=("${PIDS[@]}")

    for r in $(seq 1 "$ROUNDS"); do
        failover_round "$r"
    done
    if ((ROUNDS > 0)); then
        echo
        echo "failover on $(nproc) cores, $(uname -r): 4 nodes, R=3, --failover-after $FAILOVER_AFTER," \
            "--probe-interval 250ms (default), $RATE writes/s of 100 B started open-loop"
        printf '%-6s %-7s %12s %26s %14s %14s %14s\n' round killed "failover ms" \
            "by role: head/middle/tail" "client saw ms" "ECS began ms" "mark-failed ms"
        local l
        for l in "${FAILOVER_LINES[@]}"; do
            IFS='|' read -r -a f <<<"$l"
            printf '%-6s %-7s %12s %26s %14s %14s %14s\n' "${f[@]}"
        done
        echo "failover ms: kill -> first successful write (started after the kill) of a key whose chain held the killed node"
        echo "ECS began: kill -> the ECS's 'failing over silent nodes' (wall clocks of two processes, ~ms)"
    fi
    if ((REBUILD_KEYS > 0)); then
        rebuild_run
    fi
}

main "$@"
