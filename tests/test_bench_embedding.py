"""tests/benchmarks/bench_embedding_gpu.py --smoke: the GPU benchmark runs on CPU in CI, so it cannot rot.

Checks that every part reports a figure (bare model, the handler through RunInference, the same with a
no-op model, the whole colorize job), not the figures themselves: speed is measured, never asserted.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.pipeline
HERE = os.path.dirname(os.path.abspath(__file__))


def test_embedding_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "benchmarks", "bench_embedding_gpu.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = json.loads(out.read_text())["records"]
    kinds = {r["kind"]: r for r in records}
    assert set(kinds) == {"bare", "handler", "handler-noop", "job"}, records
    assert kinds["handler-noop"]["ms_per_chunk"] > 0
    assert all(r["images_per_s"] > 0 for r in records), records
    assert kinds["job"]["written"] == kinds["job"]["images"] == 6 and kinds["job"]["embedding_size"] == 1001
    assert "| backend | precision | batch | bare images/s |" in proc.stdout
