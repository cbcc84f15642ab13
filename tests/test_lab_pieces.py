"""Record files written from image pieces (lab_shards.write_record_file) hold the same bytes as the
records made straight from the chunk, plain and gzip, and a piece of whole records (a run staged before
image pieces) is copied as it is."""
import gzip
import os

import numpy as np
import pytest

from imagebeam.transforms.formats import lab_shards
from imagebeam.transforms.formats.lab_shards import Chunk, FittedChunk, LabItem


def chunk_of(n: int, seed: int) -> FittedChunk:
    rng = np.random.default_rng(seed)
    items = tuple(LabItem(b"k%d" % i, f"img_{seed}_{i}.JPEG" + "é" * (i % 3), "src", None, b"") for i in range(n))
    rgb = rng.integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)
    rgb[:, :40] = 255  # white bands, as a letterbox has
    return FittedChunk(Chunk("train", 0, seed, 0, items), rgb)


def write_piece(path: str, fitted: FittedChunk, embeddings, start: int, end: int) -> None:
    with open(path, "wb") as f:
        lab_shards._write_images(fitted, embeddings, start, end, f)


@pytest.mark.parametrize("record_format", ["reference", "compact"])
@pytest.mark.parametrize("with_embedding", [False, True])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_record_file_from_image_pieces_equals_records(tmp_path, record_format, with_embedding, compression):
    a, b = chunk_of(3, 1), chunk_of(4, 2)
    emb_a = np.random.default_rng(3).normal(size=(3, 1001)).astype(np.float32) if with_embedding else None
    emb_b = np.random.default_rng(4).normal(size=(4, 1001)).astype(np.float32) if with_embedding else None
    pieces = [str(tmp_path / "a.pixels"), str(tmp_path / "b.pixels")]
    write_piece(pieces[0], a, emb_a, 1, 3)
    write_piece(pieces[1], b, emb_b, 0, 4)
    legacy = str(tmp_path / "c.piece")  # whole records, as runs before image pieces staged them
    with open(legacy, "wb") as f:
        f.write(b"".join(lab_shards.chunk_records(a, emb_a, record_format)[:1]))
    out = str(tmp_path / "out.tfrecord")
    lab_shards.write_record_file(out, pieces + [legacy], record_format, compression)
    want = (b"".join(lab_shards.chunk_records(a, emb_a, record_format)[1:3])
            + b"".join(lab_shards.chunk_records(b, emb_b, record_format))
            + b"".join(lab_shards.chunk_records(a, emb_a, record_format)[:1]))
    with open(out, "rb") as f:
        got = f.read()
    assert (gzip.decompress(got) if compression == "gzip" else got) == want
    assert sorted(os.listdir(tmp_path)) == ["a.pixels", "b.pixels", "c.piece", "out.tfrecord"]  # no temporaries


def test_truncated_image_piece_is_an_error(tmp_path):
    fitted = chunk_of(2, 5)
    piece = str(tmp_path / "a.pixels")
    write_piece(piece, fitted, None, 0, 2)
    with open(piece, "r+b") as f:
        f.truncate(os.path.getsize(piece) - 10)
    with pytest.raises(IOError, match="ends inside an image"):
        lab_shards.write_record_file(str(tmp_path / "out.tfrecord"), [piece], "reference")
    assert not os.path.exists(tmp_path / "out.tfrecord")
