"""The output bytes are those of the code before the bounded-memory redesign (issue 13), recorded as
sha256 digests in tests/output_digests.json: for every job case, on 1 and 2 local workers (the portable
runner and Dask check the same digests in test_portable.py and test_dask.py)."""
import os

import pytest

from imagebeam.cli import main as cli_main
from output_digests import TOLERATE_BAD_INPUTS, cases, digests, recorded

pytestmark = pytest.mark.pipeline


def check_case(name: str, sample, out: str, extra_args=()) -> None:
    """Run one recorded case with `extra_args` (runner options) and compare every file's digest."""
    args = cases(sample)[name]
    assert cli_main([*args, "--output", out, *TOLERATE_BAD_INPUTS, *extra_args]) in (0, None)
    got, want = digests(out, sample.root), recorded()[name]
    assert sorted(got) == sorted(want), f"{name}: files differ"
    different = sorted(f for f in want if got[f] != want[f])
    assert not different, f"{name}: bytes differ from the recorded digests in {different}"


def test_recorded_digests_cover_every_case(ilsvrc):
    assert sorted(recorded()) == sorted(cases(ilsvrc))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", ["downsample-train-pickle", "downsample-train-npz", "downsample-val-pickle",
                                  "downsample-val-npz", "colorize-val-random", "colorize-train-random"])
def test_outputs_equal_recorded_digests(name, workers, ilsvrc, workdir):
    check_case(name, ilsvrc, os.path.join(workdir, "out"), ["--direct_num_workers", str(workers)])
