"""transforms/bookkeeping/staging.py: sorted runs, the plan from counts alone, unit markers; and a failure found in the
last stage of a job (the embedding, after the merge) that still lands in failures.jsonl."""
import json
import os

import pytest

from imagebeam.transforms.bookkeeping import staging
from imagebeam.transforms.inputs.sources import Failure, WorkUnit


def test_run_is_sorted_by_bucket_then_key_and_slices_read_back(tmp_path):
    entries = [(2, b"b", b"x" * 5), (0, b"z", b""), (2, b"a", b"yy"), (0, b"c", b"\0\1"), (7, b"k", b"q")]
    path = str(tmp_path / "r.run")
    index = staging.write_run(path, list(entries))
    assert [row[0] for row in index] == [0, 2, 7] and [row[3] for row in index] == [2, 2, 1]
    got = {b: staging.read_slice(path, off, n) for b, off, n, _ in index}
    assert got == {0: [(b"c", b"\0\1"), (b"z", b"")], 2: [(b"a", b"yy"), (b"b", b"x" * 5)], 7: [(b"k", b"q")]}


def test_plan_ranks_buckets_within_their_group():
    summaries = [{"run": "r1", "buckets": [[0, 0, 10, 2], [5, 10, 10, 1], [12, 20, 5, 4]]},
                 {"run": "r2", "buckets": [[5, 0, 7, 3], [11, 7, 3, 1]]}]
    tasks = staging.plan_buckets(summaries, group_size=10)
    assert [(t.bucket, t.count, t.offset, t.total) for t in tasks] == [
        (0, 2, 0, 6), (5, 4, 2, 6), (11, 1, 0, 5), (12, 4, 1, 5)]
    assert tasks[1].slices == (("r1", 10, 10), ("r2", 0, 7))
    assert [t.offset for t in staging.plan_buckets(summaries)] == [0, 2, 6, 7]


class _Items:
    """An item_fn: blobs named bad* fail, others become (len(name) % 2, name, data)."""

    def __call__(self, blob, _side=None):
        if blob.name.startswith("bad"):
            return Failure(blob.source, blob.member, "bad on purpose")
        return len(blob.name) % 2, blob.name.encode(), blob.data


def test_unit_marker_is_reused_only_with_the_same_params(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "bb.jpg", "bad.jpg"):
        (folder / name).write_bytes(name.encode() * 3)
    unit = WorkUnit("files", str(folder), members=tuple((n, 0, 0) for n in ("a.jpg", "bad.jpg", "bb.jpg")),
                    paths=tuple(str(folder / n) for n in ("a.jpg", "bad.jpg", "bb.jpg")))
    stage = str(tmp_path / "stage")
    calls = []
    items = _Items()
    fn = staging._StageUnitFn(stage, "params-1", lambda blob, *side: calls.append(blob.name) or items(blob), None)
    first = list(fn.process(unit))
    summary, failures = first[0], [o.value for o in first[1:]]
    assert summary["read"] == 3 and summary["unit"] and not summary["reused"]
    assert failures == [Failure(str(folder / "bad.jpg"), None, "bad on purpose")]
    assert len(calls) == 3
    again = list(staging._StageUnitFn(stage, "params-1", lambda *a: pytest.fail("re-read"), None).process(unit))
    assert again[0]["reused"] and again[0]["buckets"] == summary["buckets"]
    assert [o.value for o in again[1:]] == failures
    list(staging._StageUnitFn(stage, "params-2", lambda blob, *side: calls.append(blob.name) or items(blob),
                              None).process(unit))
    assert len(calls) == 6  # other params: staged again


def test_a_unit_over_the_memory_budget_is_staged_as_several_runs_that_merge_to_the_same_order(tmp_path):
    """--stage-memory bounds what a worker holds: a 1 MB budget cuts a ~3 MB unit into runs, each sorted,
    whose merge is entry for entry the merge of the one-run staging (equal keys in input order too)."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"img{i:03d}.jpg" for i in range(60)] + ["img007.jpg"]  # one name twice: an equal key
    paths = []
    for i, name in enumerate(names):
        path = folder / f"{i}-{name}"
        path.write_bytes(bytes([i % 251]) * 50_000)
        paths.append(str(path))
    unit = WorkUnit("files", str(folder), members=tuple((n, 0, 0) for n in names), paths=tuple(paths))
    merged = {}
    for budget in (1, 128):
        stage = str(tmp_path / f"stage-{budget}")
        out = list(staging._StageUnitFn(stage, "p", _Items(), None, memory_mb=budget).process(unit))
        summaries = [o for o in out if isinstance(o, dict)]
        runs = sorted(f for f in os.listdir(os.path.join(stage, staging.UNITS)) if ".run" in f)
        if budget == 1:
            assert len(runs) == len(summaries) >= 3, runs  # ~3 MB in runs of about 1 MB
            assert all(os.path.getsize(os.path.join(stage, staging.UNITS, r)) < (1 << 20) + 60_000 for r in runs)
        else:
            assert len(runs) == len(summaries) == 1
        # The unit's counts are on its first summary only.
        assert [s["read"] for s in summaries] == [len(names)] + [0] * (len(summaries) - 1)
        assert [s["unit"] for s in summaries] == [True] + [False] * (len(summaries) - 1)
        merged[budget] = [entries for task in staging.plan_buckets(summaries)
                          for entries in staging.read_bucket(task)]
        again = list(staging._StageUnitFn(stage, "p", lambda *a: pytest.fail("re-read"), None,
                                          memory_mb=budget).process(unit))
        assert [s["buckets"] for s in again] == [s["buckets"] for s in summaries] and again[0]["reused"]
    assert merged[1] == merged[128] and len(merged[1]) == len(names)
    twins = [payload for key, payload in merged[1] if key == b"img007.jpg"]
    assert twins == [bytes([7]) * 50_000, bytes([60]) * 50_000]  # input order


def test_fingerprint_follows_options_and_input_files(tmp_path):
    import argparse

    f = tmp_path / "x.tar"
    f.write_bytes(b"1")
    a = staging.fingerprint("j", argparse.Namespace(size=8, progress="x", stage_memory=128), [str(f)])
    assert a == staging.fingerprint("j", argparse.Namespace(size=8, progress="y", stage_memory=8), [str(f)])
    assert a != staging.fingerprint("j", argparse.Namespace(size=16, progress="x", stage_memory=128), [str(f)])
    f.write_bytes(b"12")
    assert a != staging.fingerprint("j", argparse.Namespace(size=8, progress="x", stage_memory=128), [str(f)])
    folder = tmp_path / "photos"
    (folder / "c").mkdir(parents=True)
    (folder / "c" / "1.jpg").write_bytes(b"1")
    b = staging.fingerprint("j", argparse.Namespace(), [str(folder)])
    (folder / "c" / "2.jpg").write_bytes(b"2")
    assert b != staging.fingerprint("j", argparse.Namespace(), [str(folder)])  # a file added to a folder


@pytest.mark.pipeline
def test_embedding_failure_in_the_last_stage_is_a_counted_failure(ilsvrc, workdir, monkeypatch):
    """A model call that raises for one chunk: its images go to failures.jsonl, the counts add up, and the
    other records are written as before."""
    from imagebeam.pipelines import colorize
    from imagebeam.transforms.model import embedding

    victim = sorted(ilsvrc.val)[0]
    real = embedding.InceptionChunkHandler.run_inference

    def flaky(self, batch, model, inference_args=None):
        if any(item.name == victim for fitted in batch for item in fitted.chunk.items):
            raise RuntimeError("device lost")
        return real(self, batch, model, inference_args)

    monkeypatch.setattr(embedding.InceptionChunkHandler, "run_inference", flaky)
    out = os.path.join(workdir, "out")
    meta = colorize.run(["--input", ilsvrc.val_tar, "--inception-weights", "random", "--batch-size", "4",
                         "--examples-per-file", "5", "--output", out, "--direct_running_mode", "in_memory"])
    with open(os.path.join(out, "failures.jsonl")) as f:
        failed = [json.loads(line) for line in f]
    assert len(failed) == 4
    assert all(r["reason"].startswith("embedding failed") and "device lost" in r["reason"] for r in failed)
    assert victim in {r["member"] for r in failed}
    c = meta["counts"]
    assert c == {"read": len(ilsvrc.val), "written": len(ilsvrc.val) - 4, "failed": 4}


def test_stage_memory_option_is_checked_before_the_pipeline_and_kept_out_of_the_fingerprint(tmp_path):
    from imagebeam.pipelines import colorize, downsample

    for job in (downsample, colorize):
        args = job.make_parser().parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                             "--stage-memory", "0"])
        with pytest.raises(SystemExit, match="--stage-memory must be at least 1"):
            job.check_args(args)
        low = staging.fingerprint("j", job.make_parser().parse_args(
            ["--input", str(tmp_path), "--output", "o", "--stage-memory", "16"]), [str(tmp_path)])
        default = staging.fingerprint("j", job.make_parser().parse_args(
            ["--input", str(tmp_path), "--output", "o"]), [str(tmp_path)])
        assert low == default  # a killed run resumes with another budget


def test_order_key_sorts_as_the_tuple_of_strings():
    """Prefixes, NUL bytes, non-ASCII and lone surrogates (file names decoded with surrogateescape)."""
    import random

    rng = random.Random(7)
    alphabet = ["", "a", "b", "\0", "\1", "é", "\udc80", "\uffff", "😀", "/", "a\0", "ab"]
    tuples = {tuple("".join(rng.choice(alphabet) for _ in range(rng.randrange(4))) for _ in range(3))
              for _ in range(3000)}
    assert sorted(tuples) == sorted(tuples, key=lambda t: staging.order_key(*t))


def test_sort_to_runs_then_merge_runs_is_a_sort_in_bounded_runs(tmp_path):
    """Elements spread over several bundles and runs (a budget of 1 MiB) come back in one sorted stream."""
    import random

    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    rng = random.Random(3)
    items = [(f"k{rng.randrange(5000):05d}", "x" * rng.randrange(400)) for _ in range(20_000)]
    prefix = str(tmp_path / "runs" / "part-")
    with beam.Pipeline() as p:
        runs = (p | beam.Create(items, reshuffle=True)
                | staging.SortToRuns(prefix, lambda kv: (0, (kv[0] + kv[1]).encode(), kv[1].encode()), memory_mb=1)
                | beam.combiners.ToList())
        got = runs | beam.Map(lambda rs: [(k.decode()[:6], v.decode())
                                          for k, v in staging.merge_runs(sorted(r["run"] for r in rs))])
        counts = runs | beam.Map(lambda rs: (len(rs), sum(r["count"] for r in rs)))
        assert_that(got, equal_to([sorted(items)]), label="Sorted")
        assert_that(counts, lambda c: _at_least_runs(c, 4, len(items)), label="Runs")


def _at_least_runs(counts, runs, total):
    (n_runs, n), = counts
    assert n_runs >= runs and n == total, counts


def test_delete_existing_tolerates_a_file_another_worker_deleted(tmp_path, monkeypatch):
    """Two record files that shared a staged piece may both delete it: the second delete must not fail
    the job (it did: BeamIOError 'No files found to delete')."""
    from imagebeam.transforms.bookkeeping import fileutil

    a, b = tmp_path / "a.pixels", tmp_path / "b.pixels"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    real_exists = fileutil.FileSystems.exists

    def exists_then_vanish(path):  # b is seen, then another worker deletes it before our delete
        found = real_exists(path)
        if path == str(b) and found:
            os.remove(path)
        return found

    monkeypatch.setattr(fileutil.FileSystems, "exists", staticmethod(exists_then_vanish))
    fileutil.delete_existing([str(a), str(b)])
    assert not a.exists() and not b.exists()
