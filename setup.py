"""imagebeam: Apache Beam pipelines that turn raw image collections into training-ready datasets."""
from setuptools import setup

TRANSFORM_STAGES = ("inputs", "imaging", "formats", "model", "bookkeeping")
DASK = ["dask[distributed]>=2024.4.2,<2027", "distributed>=2024.4.2,<2027"]

setup(
    name="imagebeam",
    version="0.1.0",
    description="Beam pipelines turning ImageNet tars, folders, URL lists and CIFAR archives into "
    "training-ready datasets (Imagenet32/64 batches, koalarization TFRecords, CIFAR pickles).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    # `pipelines/` (one module per job), `transforms/` (the reusable stages, a folder per stage) and
    # `runners/` (options, the Dask runner) sit at the top of the repository (as the design asks) but
    # install under the `imagebeam` namespace so they never clash with other top-level packages.
    packages=["imagebeam", "imagebeam.pipelines", "imagebeam.runners", "imagebeam.transforms",
              *(f"imagebeam.transforms.{stage}" for stage in TRANSFORM_STAGES)],
    package_dir={
        "imagebeam": "imagebeam",
        "imagebeam.pipelines": "pipelines",
        "imagebeam.runners": "runners",
        "imagebeam.transforms": "transforms",
    },
    install_requires=[
        "apache-beam[gcp]>=2.77,<2.78",
        "tensorflow>=2.21,<2.22",
        "tensorflow-transform>=1.21,<1.22",
        "numpy>=1.26,<2.5",
        "pillow>=10.0,<13",
        "scipy>=1.11",
        "opencv-python-headless>=4.8",  # float32 bilinear resize of the Lab target
        "numba>=0.60",                  # colorize's exact Lanczos and Lab kernels (imaging/lanczos.py, lab_kernels.py; wheels)
        "google-crc32c>=1.5",           # TFRecord framing (C implementation)
    ],
    extras_require={
        # Real photos for the bundled sample (`imagebeam demo`) and the test fixtures.
        "sample": ["scikit-image>=0.22", "scikit-learn>=1.3"],
        # `--runner dask` (runners/dask_runner.py). The floor is apache-beam 2.77's own `[dask]` extra;
        # tested with 2024.4.2 and 2026.8.0. The ceiling guards the dask.bag graph internals the runner
        # builds on (task tuples in a HighLevelGraph).
        "dask": DASK,
        # `--embedding-backend jax|torch`: Keras 3 runs the same model on them (transforms/model/embedding_backends.py).
        "jax": ["jax>=0.4.30"],
        "torch": ["torch>=2.4"],
        "test": [
            "scikit-image>=0.22",
            "scikit-learn>=1.3",
            "pytest>=8",
            "pytest-xdist>=3",
            *DASK,  # tests/test_dask.py runs the jobs on a real local dask.distributed cluster
            "jax>=0.4.30", "torch>=2.4",  # tests/test_backends.py: the same logits on every Keras backend
        ],
    },
    entry_points={"console_scripts": ["imagebeam=imagebeam.cli:main"]},
)
