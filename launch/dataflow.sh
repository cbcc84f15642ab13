#!/usr/bin/env bash
# Run an imagebeam job on Google Cloud Dataflow (Runner v2, a custom worker container).
#
# Usage: launch/dataflow.sh [--dry-run] <job> [job options] [more beam options]
#   launch/dataflow.sh colorize --input gs://BUCKET/photos --output gs://BUCKET/koalarization \
#       --inception-weights gs://BUCKET/inception_resnet_v2_2016_08_30.ckpt
#   launch/dataflow.sh downsample --input gs://BUCKET/ILSVRC2012_img_train.tar \
#       --devkit gs://BUCKET/ILSVRC2012_devkit_t12.tar.gz --output gs://BUCKET/imagenet32/train
#
# --dry-run prints the command and runs nothing. Every setting below can be overridden from the
# environment (PROJECT=my-proj BUCKET=gs://my-bucket launch/dataflow.sh ...). Flags given on the command
# line come after the defaults, so they win (Beam and argparse keep the last value).
#
# GPU_WORKERS picks where GPUs go (colorize only; the other jobs never ask for one):
#   step  (default) the accelerator is a Beam resource hint on the embedding step (RunInference) alone:
#         Dataflow right fitting runs that step on GPU workers and everything else on MACHINE_TYPE
#         workers without GPUs (batch jobs; do not combine with worker_accelerator).
#   all   every worker gets the GPUs: --dataflow_service_options=worker_accelerator=$ACCELERATOR.
#   none  no GPU anywhere (the embedding runs on CPU workers).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

# ---- settings ---------------------------------------------------------------------------------------
PROJECT="${PROJECT:-my-gcp-project}"
REGION="${REGION:-us-central1}"
BUCKET="${BUCKET:-gs://my-imagebeam-bucket}"
TEMP_LOCATION="${TEMP_LOCATION:-$BUCKET/dataflow/temp}"
STAGING_LOCATION="${STAGING_LOCATION:-$BUCKET/dataflow/staging}"
MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-8}"     # N1: the machine series T4/V100/P100 GPUs attach to
MAX_NUM_WORKERS="${MAX_NUM_WORKERS:-20}"
# Built from launch/Dockerfile.dataflow-gpu and pushed to Artifact Registry (see launch/README.md).
SDK_CONTAINER_IMAGE="${SDK_CONTAINER_IMAGE:-$REGION-docker.pkg.dev/$PROJECT/imagebeam/imagebeam-dataflow-gpu:2.77.0}"
# Ships this checkout to the workers (sdist of setup.py); empty: use the imagebeam baked into the image.
SETUP_FILE="${SETUP_FILE-$here/setup.py}"
GPU_WORKERS="${GPU_WORKERS:-step}"                 # step | all | none
ACCELERATOR="${ACCELERATOR:-type:nvidia-tesla-t4;count:1;install-nvidia-driver}"
MODEL_COPIES="${MODEL_COPIES:-1}"                  # Inception copies per worker VM (one per GPU)
IMAGEBEAM="${IMAGEBEAM:-$here/.venv/bin/imagebeam}"
# -----------------------------------------------------------------------------------------------------

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "dataflow.sh: unknown option $1 (options go after the job name)" >&2; exit 2 ;;
    esac
done
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
job="$1"; shift
case "$job" in
    fetch|verify|demo|preview|inspect) echo "dataflow.sh: '$job' is not a Beam job; run it locally (imagebeam $job)" >&2; exit 2 ;;
esac

has_flag() {  # has_flag FLAG ARGS...: FLAG given as "FLAG VALUE" or "FLAG=VALUE"
    local flag="$1"; shift
    local a
    for a in "$@"; do [[ "$a" == "$flag" || "$a" == "$flag="* ]] && return 0; done
    return 1
}

cmd=("$IMAGEBEAM" "$job"
     --runner DataflowRunner
     --project "$PROJECT"
     --region "$REGION"
     --temp_location "$TEMP_LOCATION"
     --staging_location "$STAGING_LOCATION"
     --machine_type "$MACHINE_TYPE"
     --max_num_workers "$MAX_NUM_WORKERS"
     --experiments=use_runner_v2
     --sdk_container_image "$SDK_CONTAINER_IMAGE")
if [[ -n "$SETUP_FILE" ]]; then
    cmd+=(--setup_file "$SETUP_FILE")
fi

if [[ "$job" == colorize ]]; then
    has_flag --model-copies "$@" || cmd+=(--model-copies "$MODEL_COPIES")
    if ! has_flag --embedding-accelerator "$@"; then
        case "$GPU_WORKERS" in
            step) cmd+=(--embedding-accelerator "$ACCELERATOR") ;;
            all)  cmd+=("--dataflow_service_options=worker_accelerator=$ACCELERATOR") ;;
            none) ;;
            *) echo "dataflow.sh: GPU_WORKERS must be step, all or none, not '$GPU_WORKERS'" >&2; exit 2 ;;
        esac
    fi
fi
cmd+=("$@")

if [[ $dry_run == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
