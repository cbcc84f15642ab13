#!/usr/bin/env bash
# Run an imagebeam job on an Apache Flink cluster through Beam's portable FlinkRunner.
#
# Usage: launch/flink.sh [--dry-run | --jar-url] <job> [job options] [more beam options]
#   FLINK_MASTER=flink-jm:8081 launch/flink.sh downsample --input /data/ILSVRC2012_img_val.tar \
#       --devkit /data/ILSVRC2012_devkit_t12.tar.gz --output /shared/imagenet32/val --split val
#
# --dry-run prints the command and runs nothing; --jar-url prints the Maven URL of the Flink job server
# jar that this Beam version would download, and where Beam looks for it before downloading.
# The launcher starts that job server (java -jar, Java 11+) on first use; it talks to the cluster's REST
# port (FLINK_MASTER). Settings below can be overridden from the environment.
#
# ENVIRONMENT_TYPE says where the Python SDK workers (our DoFns) run on the task managers:
#   DOCKER    one container per worker from ENVIRONMENT_CONFIG (an image with imagebeam installed, e.g.
#             the one built from launch/Dockerfile.dataflow-gpu); needs Docker on every task manager.
#   PROCESS   ENVIRONMENT_CONFIG='{"command": "/opt/apache/beam/boot"}': Beam's boot binary, present on
#             every task manager together with Python 3.11, apache-beam 2.77 and imagebeam.
#   EXTERNAL  ENVIRONMENT_CONFIG=HOST:PORT of a worker pool already running beside each task manager:
#             python -m apache_beam.runners.worker.worker_pool_main --service_port=50000 in a Python with
#             imagebeam installed (it does not install the staged sdist), or the SDK image run with
#             --worker_pool (its boot does).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

# ---- settings ---------------------------------------------------------------------------------------
FLINK_MASTER="${FLINK_MASTER:-localhost:8081}"    # the JobManager's REST address
FLINK_VERSION="${FLINK_VERSION:-}"                # must match the cluster (1.19 1.20 2.0 2.1 2.2); empty: Beam's default
FLINK_JOB_SERVER_JAR="${FLINK_JOB_SERVER_JAR:-}"  # local path or URL of beam-runners-flink-<ver>-job-server-2.77.0.jar
ENVIRONMENT_TYPE="${ENVIRONMENT_TYPE:-DOCKER}"    # DOCKER | PROCESS | EXTERNAL
ENVIRONMENT_CONFIG="${ENVIRONMENT_CONFIG:-}"      # see above; empty for DOCKER: Beam's apache/beam_python3.11_sdk:2.77.0,
                                                  # which pip-installs SETUP_FILE's package and its requirements on each start
PARALLELISM="${PARALLELISM:-4}"
SDK_WORKER_PARALLELISM="${SDK_WORKER_PARALLELISM:-1}"  # SDK worker processes per task manager
# Ships this checkout to DOCKER/PROCESS workers (Beam's boot installs it); empty: use what is installed.
SETUP_FILE="${SETUP_FILE-$here/setup.py}"
PYTHON="${PYTHON:-$here/.venv/bin/python}"
IMAGEBEAM="${IMAGEBEAM:-$here/.venv/bin/imagebeam}"
# -----------------------------------------------------------------------------------------------------

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

jar_url() {
    "$PYTHON" - "$FLINK_VERSION" <<'EOF'
import os, sys
from apache_beam.options.pipeline_options import FlinkRunnerOptions
from apache_beam.utils.subprocess_server import JavaJarServer
version = sys.argv[1] or FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS[-1]
url = JavaJarServer.path_to_beam_jar(f":runners:flink:{version}:job-server:shadowJar")
print(url)
print("# Beam uses it without downloading if it is at:", os.path.join(JavaJarServer.JAR_CACHE, os.path.basename(url)))
print("# or pass FLINK_JOB_SERVER_JAR=/path/to/" + os.path.basename(url))
EOF
}

dry_run=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --jar-url) jar_url; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "flink.sh: unknown option $1 (options go after the job name)" >&2; exit 2 ;;
    esac
done
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
job="$1"; shift
case "$job" in
    fetch|verify|demo|preview|inspect) echo "flink.sh: '$job' is not a Beam job; run it locally (imagebeam $job)" >&2; exit 2 ;;
esac
case "$ENVIRONMENT_TYPE" in
    DOCKER|PROCESS|EXTERNAL) ;;
    *) echo "flink.sh: ENVIRONMENT_TYPE must be DOCKER, PROCESS or EXTERNAL, not '$ENVIRONMENT_TYPE'" >&2; exit 2 ;;
esac
if [[ "$ENVIRONMENT_TYPE" != DOCKER && -z "$ENVIRONMENT_CONFIG" ]]; then
    echo "flink.sh: ENVIRONMENT_TYPE=$ENVIRONMENT_TYPE needs ENVIRONMENT_CONFIG (see launch/flink.sh --help)" >&2
    exit 2
fi

cmd=("$IMAGEBEAM" "$job"
     --runner FlinkRunner
     --flink_master "$FLINK_MASTER"
     --environment_type "$ENVIRONMENT_TYPE"
     --parallelism "$PARALLELISM"
     --sdk_worker_parallelism "$SDK_WORKER_PARALLELISM")
[[ -n "$ENVIRONMENT_CONFIG" ]] && cmd+=(--environment_config "$ENVIRONMENT_CONFIG")
[[ -n "$FLINK_VERSION" ]] && cmd+=(--flink_version "$FLINK_VERSION")
[[ -n "$FLINK_JOB_SERVER_JAR" ]] && cmd+=(--flink_job_server_jar "$FLINK_JOB_SERVER_JAR")
[[ -n "$SETUP_FILE" ]] && cmd+=(--setup_file "$SETUP_FILE")
cmd+=("$@")

if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
