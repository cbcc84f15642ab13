"""The table every job prints at the end."""
import json
import os

from imagebeam.transforms.bookkeeping.report import summary_table


def test_summary_table_lists_counts_files_and_reasons(tmp_path):
    with open(tmp_path / "failures.jsonl", "w") as f:
        for reason in ("truncated image data: x", "truncated image data: y", "not an image: z"):
            f.write(json.dumps({"source": "s", "member": "m", "reason": reason}) + "\n")
    meta = {"counts": {"read": 5, "written": 2, "failed": 3},
            "files": [{"file": "train_data_batch_1", "rows": 1}, {"file": "train_data_batch_2", "rows": 1}]}
    table = summary_table("downsample train 32x32", meta, str(tmp_path)).splitlines()
    assert table[0] == "downsample train 32x32"
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["read"].split()[1] == "5" and rows["written"].split()[1] == "2"
    assert "truncated image data" in table[4] and table[4].split()[-1] == "2"
    assert "not an image" in table[5] and table[5].split()[-1] == "1"
    assert "train_data_batch_1 (1), train_data_batch_2 (1)" in rows["files"]
    assert rows["metadata"].endswith("metadata.json")


def test_failures_jsonl_is_an_external_sort_of_every_failure_set(tmp_path, monkeypatch):
    """Several failure sets, each sorted to runs where it is produced (runs of 1 MiB: many), merged into
    the same bytes as one in-memory sort of them all; the runs are gone afterwards."""
    import random

    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from imagebeam.transforms.bookkeeping import report
    from imagebeam.transforms.inputs.sources import Failure

    monkeypatch.setattr(report, "FAILURE_RUN_MB", 1)
    rng = random.Random(11)
    sets = [[Failure(f"/lists/list-{rng.randrange(3)}.txt", rng.choice([None, f"http://h/{rng.randrange(9000)}"]),
                     rng.choice(["blocked: private address", "http_404: not found", "repeated URL: listed 2 times"]))
             for _ in range(n)] for n in (15_000, 1, 0, 7_000)]
    out = str(tmp_path)
    with beam.Pipeline() as p:
        pcolls = tuple(p | f"Set{i}" >> beam.Create(s, reshuffle=True) for i, s in enumerate(sets))
        n = pcolls | report.WriteFailures(out)
        assert_that(n, equal_to([22_001]))
    data = (tmp_path / "failures.jsonl").read_bytes()
    assert data == report.failure_lines([f for s in sets for f in s])
    assert sorted(os.listdir(tmp_path)) == ["failures.jsonl"]


def test_failures_jsonl_is_written_when_nothing_failed(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from imagebeam.transforms.bookkeeping import report

    with beam.Pipeline() as p:
        n = p | beam.Create([]) | report.WriteFailures(str(tmp_path))
        assert_that(n, equal_to([0]))
    assert (tmp_path / "failures.jsonl").read_bytes() == b""
