# Shell functions shared by the benchmark scripts (sourced). They use the caller's `say`,
# `die`, `$TMP` (where logs go) and `PIDS` (background processes to stop on exit).

# A port that nothing on this machine listens on or uses, over TCP or UDP.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! ss -Htuan | awk '{print $5}' | grep -q ":$port\$"; then
            echo "$port"
            return
        fi
    done
}

wait_until() { # seconds description command...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not come up (logs in $TMP)"
        sleep 0.1
    done
}

# Holds /dev/cpu_dma_latency at 0 (no deep C-states, which add wake-up latency to every
# request) while this script runs.
hold_cpu_dma_latency() {
    if [[ ! -w /dev/cpu_dma_latency ]]; then
        say "cannot write /dev/cpu_dma_latency: latencies include C-state exits"
        return
    fi
    python3 -c 'import os, struct, time
fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
os.write(fd, struct.pack("i", 0))
time.sleep(1e6)' &
    PIDS+=($!)
    say "holding /dev/cpu_dma_latency at 0 (pid $!)"
}
