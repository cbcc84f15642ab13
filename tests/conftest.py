"""Fixtures: ILSVRC-style tars, a devkit (scipy.io.savemat) and folders built from real photos."""
import os
import shutil

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # inherited by the pipelines' SDK worker processes
# Pipelines built in test modules run their DoFns in SDK worker processes, which import them by name.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)

from imagebeam import sample as sample_lib


@pytest.fixture(scope="session")
def good_jpeg():
    return next(sample_lib.imagenet_like_jpegs(1, seed=7))


@pytest.fixture(scope="session")
def ilsvrc(tmp_path_factory, good_jpeg):
    """Nested train tar (with oddities and 4 bad files in one class), flat val tar, devkit, class map."""
    root = str(tmp_path_factory.mktemp("ilsvrc"))
    extra = {
        "n01440764": sample_lib.oddities(),
        "n01751748": sample_lib.bad_inputs(good_jpeg),
    }
    return sample_lib.build_ilsvrc_sample(root, per_class=9, val_per_class=4, extra_train=extra)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """root/<class>/*.jpg from real photos (classes named like a user's, not WNIDs)."""
    root = str(tmp_path_factory.mktemp("folder"))
    jpegs = list(sample_lib.imagenet_like_jpegs(10, seed=3))
    for i, data in enumerate(jpegs):
        cls = ("zebra", "apple", "mango")[i % 3]
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        with open(os.path.join(root, cls, f"img_{i:03d}.jpg"), "wb") as f:
            f.write(data)
    return root


@pytest.fixture
def workdir(tmp_path):
    yield str(tmp_path)
    shutil.rmtree(str(tmp_path), ignore_errors=True)
