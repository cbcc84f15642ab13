#!/usr/bin/env bash
# A local dask.distributed cluster for imagebeam's Dask runner: one scheduler and N workers on 127.0.0.1.
#
#   launch/dask.sh start [N_WORKERS=2] [THREADS_PER_WORKER=1]   # prints the scheduler address
#   launch/dask.sh run <job> [job options]                      # imagebeam <job> ... --runner dask --dask-address ADDR
#   launch/dask.sh status
#   launch/dask.sh stop
#
# Example:
#   launch/dask.sh start 2
#   launch/dask.sh run downsample --input ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz \
#       --output out/imagenet32/val --split val --size 32
#   # the same as: imagebeam downsample ... --runner dask --dask-address 127.0.0.1:8786
#   launch/dask.sh stop
#
# Environment: DASK_PORT (default 8786; a free port is chosen if it is taken), DASK_DIR (state, logs and
# worker scratch space; default $TMPDIR/imagebeam-dask-UID), PYTHON (default .venv/bin/python).
# The workers run the same interpreter, so they import imagebeam from the same (editable) installation;
# on a real cluster install the imagebeam wheel on every worker (see launch/README.md, "Dask").
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
state="${DASK_DIR:-${TMPDIR:-/tmp}/imagebeam-dask-$(id -u)}"

address() { cat "$state/address" 2>/dev/null || true; }

running() {  # true if the recorded scheduler process is alive
    [[ -f "$state/scheduler.pid" ]] && kill -0 "$(cat "$state/scheduler.pid")" 2>/dev/null
}

free_port() {
    "$python" - "$1" <<'EOF'
import socket, sys
want = int(sys.argv[1])
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the scheduler binds: TIME_WAIT is no obstacle
    try:
        s.bind(("127.0.0.1", want))
        print(want)
    except OSError:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
EOF
}

start() {
    local workers="${1:-2}" threads="${2:-1}"
    if running; then
        echo "already running at $(address) (launch/dask.sh stop first)" >&2
        exit 1
    fi
    mkdir -p "$state"
    local port
    port="$(free_port "${DASK_PORT:-8786}")"
    local addr="127.0.0.1:$port"
    # Each process leads its own process group (setsid), so `stop` ends a worker's nanny and its child.
    setsid "$python" -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$port" --no-dashboard \
        >"$state/scheduler.log" 2>&1 </dev/null &
    echo $! >"$state/scheduler.pid"
    echo "$addr" >"$state/address"
    : >"$state/workers.pid"
    for i in $(seq 1 "$workers"); do
        setsid "$python" -m distributed.cli.dask_worker "tcp://$addr" --host 127.0.0.1 --nworkers 1 \
            --nthreads "$threads" --no-dashboard --name "imagebeam-$i" \
            --local-directory "$state/worker-$i" >"$state/worker-$i.log" 2>&1 </dev/null &
        echo $! >>"$state/workers.pid"
    done
    # Wait until every worker has registered with the scheduler.
    if ! "$python" - "$addr" "$workers" <<'EOF'
import sys
from distributed import Client
with Client(sys.argv[1], timeout=60) as client:
    client.wait_for_workers(int(sys.argv[2]), timeout=120)
EOF
    then
        echo "the cluster did not come up; logs in $state" >&2
        stop
        exit 1
    fi
    echo "dask scheduler at $addr with $workers workers x $threads threads (logs: $state)"
    echo "run a job:  imagebeam <job> ... --runner dask --dask-address $addr"
}

stop() {
    local pid
    if [[ -f "$state/workers.pid" ]]; then
        while read -r pid; do
            if [[ -n "$pid" ]]; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
        done <"$state/workers.pid"
    fi
    if [[ -f "$state/scheduler.pid" ]]; then
        pid="$(cat "$state/scheduler.pid")"
        kill -TERM -- "-$pid" 2>/dev/null || true
    fi
    local alive
    for _ in $(seq 1 50); do  # up to 10 s for a clean shutdown
        alive=0
        for f in "$state/workers.pid" "$state/scheduler.pid"; do
            [[ -f "$f" ]] || continue
            while read -r pid; do
                if [[ -n "$pid" ]] && kill -0 -- "-$pid" 2>/dev/null; then alive=1; fi
            done <"$f"
        done
        [[ "$alive" == 0 ]] && break
        sleep 0.2
    done
    for f in "$state/workers.pid" "$state/scheduler.pid"; do
        [[ -f "$f" ]] || continue
        while read -r pid; do
            if [[ -n "$pid" ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        done <"$f"
        rm -f "$f"
    done
    rm -f "$state/address"
    echo "stopped"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status)
        if running; then
            "$python" -c "import sys; from distributed import Client
with Client(sys.argv[1], timeout=10) as c:
    print(sys.argv[1], {w: n for w, n in c.nthreads().items()})" "$(address)"
        else
            echo "not running"
            exit 1
        fi ;;
    run)
        shift
        running || { echo "no cluster: launch/dask.sh start first" >&2; exit 1; }
        exec "${IMAGEBEAM:-$here/.venv/bin/imagebeam}" "$@" --runner dask --dask-address "$(address)" ;;
    *)
        sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
        exit 2 ;;
esac
