#!/usr/bin/env bash
# Run an imagebeam job locally: Beam's FnApiRunner, one SDK worker process per core, no network.
# Usage: launch/local.sh <job> [job options] [beam options]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "${IMAGEBEAM:-$here/.venv/bin/imagebeam}" "$@" --runner local
