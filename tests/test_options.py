"""Local runner defaults, and the FnApiRunner mode we refuse."""
import pytest

from imagebeam.runners import options


def test_local_defaults():
    args = options.beam_args_with_defaults([])
    assert args[args.index("--runner") + 1] == options.LOCAL_RUNNER
    assert args[args.index("--direct_running_mode") + 1] == "multi_processing"
    assert args[args.index("--direct_num_workers") + 1] == "0"
    in_process = options.beam_args_with_defaults([], local_mode="in_memory")
    assert in_process[in_process.index("--direct_running_mode") + 1] == "in_memory"
    chosen = options.beam_args_with_defaults(["--direct_running_mode", "multi_processing"], local_mode="in_memory")
    assert chosen.count("--direct_running_mode") == 1
    assert options.beam_args_with_defaults(["--runner", "DataflowRunner"]) == ["--runner", "DataflowRunner"]
    assert options.beam_args_with_defaults(["--runner", "dask", "--dask-address", "h:8786"]) == [
        "--dask_client_address", "h:8786", "--runner", options.DASK_RUNNER]  # no local-runner flags
    portable = options.beam_args_with_defaults(["--runner", "portable"])
    assert portable[:4] == ["--runner", "PortableRunner", "--job_endpoint", "embed"] and "--direct_num_workers" in portable


@pytest.mark.parametrize("flag", [["--direct_running_mode", "multi_threading"],
                                  ["--direct_running_mode=multi_threading"]])
def test_multi_threading_refused(flag):
    with pytest.raises(SystemExit, match="drops and corrupts"):
        options.beam_args_with_defaults(flag)
