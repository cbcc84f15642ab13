"""Dataflow wiring, checked without a cloud: no network, no credentials, nothing submitted.

- colorize's `--embedding-accelerator` becomes a Beam accelerator resource hint on the embedding step
  (RunInference) and on nothing else, both in the graph Beam builds and in the pipeline proto that
  Beam's DataflowRunner prepares for the service (`--dry_run`: full translation, staging artefacts
  built, returns before any client exists; the client is replaced by a tripwire here anyway);
- downsample's graph translates for Dataflow and asks for no accelerator;
- the package that `--setup_file` ships (the sdist the DataflowRunner stages as workflow.tar.gz) holds
  every imagebeam module the workers import, installs under the imagebeam namespace, and declares the
  runtime requirements of the code it ships.
"""
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from imagebeam.pipelines import colorize, downsample
from imagebeam.runners import options as job_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATOR_URN = "beam:resources:accelerator:v1"
HINT = "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
IMAGE = "us-central1-docker.pkg.dev/imagebeam-test/imagebeam/imagebeam-dataflow-gpu:2.77.0"
BUCKET = "gs://imagebeam-test-bucket"
# Steps of colorize that run on CPU workers: none of them (nor their parts) may ask for a GPU.
CPU_STEPS = ("IndexInputs", "BucketCount", "StageImages", "MergeChunks", "Letterbox", "WriteRecordFiles",
             "WriteFailures", "CountUnits", "EmbeddingSizes", "WriteMetadata")
SOURCE_DIRS = ("imagebeam", "pipelines", "runners", "transforms")  # installed as imagebeam, imagebeam.pipelines, ...
# Shipped modules that never run on Beam workers and whose imports come from a setup.py extra instead.
OPTIONAL_MODULES = {
    "imagebeam/sample.py": "sample",       # builds the demo/test photos, locally
    "runners/dask_runner.py": "dask",    # the launcher-side Dask runner (its error says imagebeam[dask])
    # --embedding-backend jax / torch (its error says imagebeam[jax] / imagebeam[torch])
    "transforms/model/embedding_backends.py": ("jax", "torch"),
}


def dataflow_args(*extra):
    """The Beam options launch/dataflow.sh passes, plus Beam's --dry_run (never submit)."""
    return ["--runner", "DataflowRunner", "--project", "imagebeam-test", "--region", "us-central1",
            "--temp_location", f"{BUCKET}/temp", "--staging_location", f"{BUCKET}/staging",
            "--setup_file", os.path.join(REPO, "setup.py"), "--experiments=use_runner_v2",
            "--machine_type", "n1-standard-8", "--max_num_workers", "4", "--sdk_container_image", IMAGE,
            "--dry_run", "True", *extra]


def colorize_args(image_folder, *extra):
    args = colorize.make_parser().parse_args(
        ["--input", image_folder, "--output", f"{BUCKET}/koalarization", "--model-copies", "1", *extra])
    colorize.check_args(args, "DataflowRunner")  # remote workers: their caches are theirs to check
    return args


def hints_by_transform(proto):
    """{transform name: {urn: value}} for every transform with an environment."""
    envs = proto.components.environments
    return {t.unique_name: dict(envs[t.environment_id].resource_hints)
            for t in proto.components.transforms.values() if t.environment_id}


def leaves_under(proto, prefix):
    return [t.unique_name for t in proto.components.transforms.values()
            if t.unique_name.startswith(prefix) and not t.subtransforms]


def assert_only_embedding_hinted(proto):
    hints = hints_by_transform(proto)
    hinted = {name for name, h in hints.items() if ACCELERATOR_URN in h}
    assert hinted, "no transform carries the accelerator hint"
    assert all(name == "EmbedChunks" or name.startswith("EmbedChunks/") for name in hinted), sorted(hinted)
    assert {hints[name][ACCELERATOR_URN] for name in hinted} == {HINT.encode()}
    inference = leaves_under(proto, "EmbedChunks/RunInference/")
    assert any("RunInferenceDoFn" in name for name in inference), inference
    assert set(inference) <= hinted, sorted(set(inference) - hinted)
    for step in CPU_STEPS:
        names = [n for n in hints if n == step or n.startswith(step + "/")]
        assert names, f"{step} is not in the graph"
        assert not any(hints[n] for n in names), {n: hints[n] for n in names if hints[n]}


def test_dataflow_options_pass_through_unchanged():
    """Our local defaults (FnApiRunner, multi_processing) are never added to a cluster runner's options."""
    args = dataflow_args()
    assert job_options.beam_args_with_defaults(args) == args
    flink = ["--runner", "FlinkRunner", "--flink_master", "flink-jm:8081", "--environment_type", "DOCKER",
             "--parallelism", "4"]
    assert job_options.beam_args_with_defaults(flink) == flink
    assert not job_options._uses_local_grpc(PipelineOptions(args))


def test_colorize_graph_hints_only_the_embedding(image_folder):
    p = beam.Pipeline(options=PipelineOptions(dataflow_args()))
    colorize.build(p, colorize_args(image_folder, "--embedding-accelerator", HINT))
    assert_only_embedding_hinted(p.to_runner_api())


def test_no_accelerator_by_default(image_folder):
    p = beam.Pipeline(options=PipelineOptions(dataflow_args()))
    colorize.build(p, colorize_args(image_folder))
    proto = p.to_runner_api()
    assert not any(hints_by_transform(proto).values())
    assert not any(env.resource_hints for env in proto.components.environments.values())


@pytest.fixture
def no_submission(monkeypatch, tmp_path):
    """A tripwire on the Dataflow client, and Beam's staging temp files kept under tmp_path."""
    from apache_beam.runners.dataflow.internal import apiclient

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to create a Dataflow client (it would submit a job)")

    monkeypatch.setattr(apiclient, "DataflowApplicationClient", refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def dataflow_dry_run(build, *build_args):
    """Build and hand the pipeline to Beam's DataflowRunner with --dry_run: the proto the service would get."""
    p = beam.Pipeline(options=PipelineOptions(dataflow_args()))
    build(p, *build_args)
    result = p.run()
    assert result.state == "DONE" and p.runner.job is not None  # dry run: the job was prepared, not sent
    return p.runner.proto_pipeline


def docker_image(env):
    assert env.urn == "beam:env:docker:v1"
    return beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image


def staged(*artifacts_or_env):
    """{staged name: local file} of artefacts (an environment's dependencies, or ArtifactInformation)."""
    out = {}
    for item in artifacts_or_env:
        for dep in getattr(item, "dependencies", [item]):
            path = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
            out[beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name] = path
    return out


def test_dataflow_translation_keeps_the_hint_on_the_embedding_only(image_folder, no_submission):
    proto = dataflow_dry_run(colorize.build, colorize_args(image_folder, "--embedding-accelerator", HINT))
    assert_only_embedding_hinted(proto)
    envs = proto.components.environments
    # Two worker environments: the default one and a copy that asks for the GPU; same container.
    assert sorted(dict(e.resource_hints) == {ACCELERATOR_URN: HINT.encode()} for e in envs.values()) == [False, True]
    assert all(not e.resource_hints for e in envs.values() if ACCELERATOR_URN not in e.resource_hints)
    assert {docker_image(e) for e in envs.values()} == {IMAGE}
    for env in envs.values():
        assert os.path.isfile(staged(env)["workflow.tar.gz"])  # --setup_file's sdist, for every worker


def test_downsample_translates_for_dataflow_without_accelerators(ilsvrc, no_submission):
    for split, tar in (("train", ilsvrc.train_tar), ("val", ilsvrc.val_tar)):
        args = downsample.make_parser().parse_args(
            ["--input", tar, "--devkit", ilsvrc.devkit, "--output", f"{BUCKET}/imagenet32/{split}",
             "--split", split])
        proto = dataflow_dry_run(downsample.build, args)
        assert not any(e.resource_hints for e in proto.components.environments.values())
        assert {docker_image(e) for e in proto.components.environments.values()} == {IMAGE}
        names = {t.unique_name for t in proto.components.transforms.values()}
        assert {"IndexInputs", "StageRows", "MergeBatches", "WriteMetadata"} <= names


# --- the package --setup_file ships --------------------------------------------------------------------

LAZY_WORKER_MODULES = ("imagebeam.transforms.model.embedding",)  # pipelines/colorize.py imports it in build()


def worker_modules():
    """{module: is a package} for the imagebeam modules loaded by importing every job's module (in a
    clean interpreter, so this process stays free of whatever the jobs import), plus those a job imports
    only when it builds a step (colorize's embedding)."""
    code = ("import importlib, sys\n"
            "from imagebeam.cli import JOBS\n"
            "for target, _ in JOBS.values():\n"
            "    importlib.import_module(target.partition(':')[0])\n"
            f"for lazy in {LAZY_WORKER_MODULES!r}:\n"
            "    importlib.import_module(lazy)\n"
            "for m in sorted(sys.modules):\n"
            "    if m == 'imagebeam' or m.startswith('imagebeam.'):\n"
            "        print(m, int(hasattr(sys.modules[m], '__path__')))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    return {m: bool(int(flag)) for m, flag in (line.split() for line in out.stdout.splitlines())}


def source_files():
    """Every .py file of the shipped source folders (subfolders included), as repository paths."""
    for src in SOURCE_DIRS:
        for dirpath, dirnames, names in os.walk(os.path.join(REPO, src)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, name), REPO).replace(os.sep, "/")


def source_path(module, is_package):
    """Where a module lives in the repository (= in the sdist): imagebeam.pipelines.colorize ->
    pipelines/colorize.py, imagebeam.transforms -> transforms/__init__.py, imagebeam.cli -> imagebeam/cli.py."""
    parts = module.split(".")[1:]
    base = "imagebeam"
    if parts and parts[0] in ("pipelines", "runners", "transforms"):
        base, parts = parts[0], parts[1:]
    return "/".join([base, *parts, "__init__.py"] if is_package else [base, *parts[:-1], parts[-1] + ".py"])


def installed_path(module, is_package):
    """Where pip installs it: imagebeam.pipelines.colorize -> imagebeam/pipelines/colorize.py."""
    parts = module.split(".")
    return "/".join(parts + ["__init__.py"]) if is_package else "/".join(parts) + ".py"


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The sdist Beam builds from --setup_file (its own Stager, as the DataflowRunner does), and that
    sdist pip-installed (no dependencies) into a folder, the way Beam's worker boot installs it."""
    from apache_beam.runners.portability.stager import Stager

    root = tmp_path_factory.mktemp("shipped")
    options = PipelineOptions(["--setup_file", os.path.join(REPO, "setup.py")])
    build = root / "build"
    build.mkdir()
    resources = Stager.create_job_resources(options, str(build), log_submission_env_dependencies=False)
    sdist = staged(*resources)["workflow.tar.gz"]
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), sdist], check=True, cwd=str(root))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    yield {"sdist": sdist, "members": {n[len(top) + 1:] for n in names if "/" in n}, "pkg_info": pkg_info,
           "site": str(target)}
    shutil.rmtree(str(root), ignore_errors=True)


def test_sdist_holds_every_module_the_workers_import(shipped):
    modules = worker_modules()
    for job in ("colorize", "downsample", "download", "cifar", "resize", "imagenet_layout", "fetch_archive"):
        assert f"imagebeam.pipelines.{job}" in modules
    assert "imagebeam.transforms.model.embedding" in modules
    for module, is_package in modules.items():
        src = source_path(module, is_package)
        assert src in shipped["members"], f"{module}: {src} is not in {shipped['sdist']}"
        dest = installed_path(module, is_package)
        assert os.path.isfile(os.path.join(shipped["site"], dest)), f"{module}: pip did not install {dest}"
    # Every source file, including modules that are only imported lazily on the workers.
    for path in source_files():
        assert path in shipped["members"], f"{path} is not shipped"
    # setup.py reads README.md when the worker builds the package.
    assert {"setup.py", "README.md"} <= shipped["members"]


def test_installed_package_imports_every_job(shipped):
    """The installed sdist alone (not this checkout) provides imagebeam and every job module."""
    code = ("import importlib, imagebeam\n"
            "from imagebeam.cli import JOBS\n"
            "for target, _ in JOBS.values():\n"
            "    importlib.import_module(target.partition(':')[0])\n"
            "print(imagebeam.__file__)\n")
    env = dict(os.environ, PYTHONPATH=shipped["site"])
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=shipped["site"], env=env)
    assert out.stdout.strip().startswith(shipped["site"] + os.sep)


def requirements(pkg_info):
    """{extra or None: [Requirement]} from PKG-INFO's Requires-Dist lines."""
    from packaging.requirements import Requirement

    out = {}
    for line in pkg_info.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            extra = None
            if req.marker is not None and "extra" in str(req.marker):
                extra = str(req.marker).split("==")[1].strip().strip("\"'")
            out.setdefault(extra, []).append(req)
    return out


def _canonical(name):
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def closure(reqs):
    """Distributions pulled in by `reqs` (with their extras), from the installed packages' metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = _canonical(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            sub = Requirement(line)
            env_ok = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if env_ok:
                todo.append((sub, frozenset(sub.extras)))
    return {name for name, _ in seen}


def third_party_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "imagebeam":
                yield top


def test_shipped_package_declares_what_its_code_imports(shipped):
    from importlib.metadata import packages_distributions

    reqs = requirements(shipped["pkg_info"])
    direct = {_canonical(r.name) for r in reqs[None]}
    assert {"apache-beam", "numpy", "pillow", "opencv-python-headless", "google-crc32c", "scipy", "numba",
            "tensorflow", "tensorflow-transform"} <= direct
    assert any(r.name == "apache-beam" and "gcp" in r.extras for r in reqs[None])  # gs:// on the workers
    provided = closure(reqs[None])
    dists = packages_distributions()
    missing = []
    for path in source_files():
        extras = OPTIONAL_MODULES.get(path, ())
        extras = (extras,) if isinstance(extras, str) else extras
        allowed = set(provided)
        for extra in extras:
            allowed |= closure(reqs.get(extra, []))
        extra = " / ".join(extras)
        for module in sorted(set(third_party_imports(os.path.join(REPO, path)))):
            found = {_canonical(d) for d in dists.get(module, [])}
            if not found & allowed:
                where = f"install_requires or the '{extra}' extra" if extra else "install_requires"
                missing.append(f"{path}: import {module} ({', '.join(sorted(found)) or 'not installed'}) "
                               f"is not in {where}")
    assert not missing, "undeclared dependencies of the shipped code: " + "; ".join(missing)
