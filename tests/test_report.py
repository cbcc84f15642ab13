"""The table every job prints at the end."""
import json

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
