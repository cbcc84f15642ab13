"""Record files written from ranges of image pieces (lab_shards.write_record_file) hold the same bytes as
the records made straight from the chunk, plain and gzip; ranks are placed from the pieces' row counts
(lab_shards.place_pieces) the way one ordered list of all rows would cut them into files."""
import gzip
import os

import numpy as np
import pytest

from imagebeam.transforms.formats import lab_shards
from imagebeam.transforms.formats.lab_shards import Chunk, FittedChunk, LabItem, Piece


def chunk_of(n: int, seed: int) -> FittedChunk:
    rng = np.random.default_rng(seed)
    items = tuple(LabItem(b"k%d" % i, f"img_{seed}_{i}.JPEG" + "é" * (i % 3), "src", None, b"") for i in range(n))
    rgb = rng.integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)
    rgb[:, :40] = 255  # white bands, as a letterbox has
    return FittedChunk(Chunk("train", 0, seed, items), items, rgb, ())


def write_piece(path: str, fitted: FittedChunk, embeddings) -> None:
    with open(path, "wb") as f:
        lab_shards.write_images(fitted, embeddings, f)


@pytest.mark.parametrize("record_format", ["reference", "compact"])
@pytest.mark.parametrize("with_embedding", [False, True])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_record_file_from_piece_ranges_equals_records(tmp_path, record_format, with_embedding, compression):
    a, b = chunk_of(3, 1), chunk_of(4, 2)
    emb_a = np.random.default_rng(3).normal(size=(3, 1001)).astype(np.float32) if with_embedding else None
    emb_b = np.random.default_rng(4).normal(size=(4, 1001)).astype(np.float32) if with_embedding else None
    pieces = [str(tmp_path / "a.pixels"), str(tmp_path / "b.pixels")]
    write_piece(pieces[0], a, emb_a)
    write_piece(pieces[1], b, emb_b)
    out = str(tmp_path / "out.tfrecord")
    # the middle of a, all of b, the start of a: ranges skip images at the front and stop before the end
    lab_shards.write_record_file(out, [(pieces[0], 1, 2), (pieces[1], 0, 4), (pieces[0], 0, 1)], record_format,
                                 compression)
    records_a = lab_shards.chunk_records(a, emb_a, record_format)
    want = records_a[1] + b"".join(lab_shards.chunk_records(b, emb_b, record_format)) + records_a[0]
    with open(out, "rb") as f:
        got = f.read()
    assert (gzip.decompress(got) if compression == "gzip" else got) == want
    assert sorted(os.listdir(tmp_path)) == ["a.pixels", "b.pixels", "out.tfrecord"]  # no temporaries


def test_truncated_image_piece_is_an_error(tmp_path):
    fitted = chunk_of(2, 5)
    piece = str(tmp_path / "a.pixels")
    write_piece(piece, fitted, None)
    with open(piece, "r+b") as f:
        f.truncate(os.path.getsize(piece) - 10)
    with pytest.raises(IOError, match="ends inside an image"):
        lab_shards.write_record_file(str(tmp_path / "out.tfrecord"), [(piece, 0, 2)], "reference")
    whole = str(tmp_path / "b.pixels")
    write_piece(whole, fitted, None)
    with pytest.raises(IOError, match="holds 2 images, not 3"):
        lab_shards.write_record_file(str(tmp_path / "out.tfrecord"), [(whole, 1, 3)], "reference")
    assert not os.path.exists(tmp_path / "out.tfrecord")


@pytest.mark.parametrize("per_file", [1, 3, 7, 64, 500])
def test_placed_ranks_cut_files_as_one_ordered_list(per_file):
    """Pieces of random sizes (some empty: every image failed) in two splits and many buckets, placed
    bucket by bucket with the offsets side input, give each file exactly the rows one ordered list of
    every row would give it, and each piece's first/last file are the files its rows went to."""
    rng = np.random.default_rng(per_file)
    pieces = [Piece(split, bucket, chunk, f"{split}-{bucket}-{chunk}", int(rng.integers(0, 9)), 0)
              for split in ("train", "val") for bucket in rng.choice(50, 12, replace=False)
              for chunk in range(int(rng.integers(1, 4)))]
    rng.shuffle(pieces)
    by_bucket = {}
    for p in pieces:
        by_bucket.setdefault((p.split, p.bucket), []).append(p)
    offsets = lab_shards.bucket_offsets([(k, sum(p.rows for p in ps)) for k, ps in by_bucket.items()])
    files = {}
    for key, ps in by_bucket.items():
        for file_key, placed in lab_shards.place_pieces(key, ps, per_file, offsets):
            files.setdefault(file_key, []).append(placed)
    for split in ("train", "val"):
        rows = [(p.path, i) for p in sorted(pieces, key=lambda p: (p.bucket, p.chunk)) if p.split == split
                for i in range(p.rows)]
        want = [rows[i:i + per_file] for i in range(0, len(rows), per_file)]
        got = [[(p.path, i) for p in sorted(files[(split, k)]) for i in range(p.start, p.end)]
               for k in range(len(want))]
        assert got == want
        assert not [k for s, k in files if s == split and k >= len(want)]
    for (split, k), placed in files.items():
        for p in placed:
            assert p.first_file <= k <= p.last_file
            assert p.rows == next(q.rows for q in pieces if q.path == p.path)


def test_chunk_marker_records_failures_for_a_rerun(tmp_path):
    """A chunk's marker holds its piece and the failures of its decode, and ChunkMerger gives both back on
    a re-run instead of the chunk (so failures.jsonl is the same after a kill)."""
    from apache_beam import pvalue

    from imagebeam.transforms.bookkeeping.staging import BucketTask
    from imagebeam.transforms.inputs.sources import Failure

    good = chunk_of(2, 7)
    failed = (Failure("a.tar", "x/bad.JPEG", "truncated image data: image file is truncated"),)
    fitted = FittedChunk(good.chunk, good.items, good.rgb, failed)
    staging = str(tmp_path)
    out = list(lab_shards._WritePiecesFn(staging).process((fitted, None)))
    piece = out[0]
    assert piece == Piece("train", 0, 7, os.path.join(staging, "train-00000-00007.pixels"), 2, 0)
    assert [o.value for o in out[1:] if isinstance(o, pvalue.TaggedOutput)] == list(failed)
    entries = [(b"k%04d" % i, lab_shards.pack_item(LabItem(b"k%04d" % i, f"n{i}", "src", None, b"x")))
               for i in range(8 * 64 - 5)]  # a bucket of 8 chunks of 64 (the last one short)
    merged = list(lab_shards.ChunkMerger(64, staging)(BucketTask(0, (), len(entries), 0, len(entries)), entries))
    again = [o for o in merged if isinstance(o, pvalue.TaggedOutput)]
    assert [(o.tag, tuple(o.value)) for o in again] == [(lab_shards.DONE, tuple(piece)),
                                                      (lab_shards.DONE_FAILURES, failed[0])]
    chunks = [o for o in merged if not isinstance(o, pvalue.TaggedOutput)]
    assert [c.index for c in chunks] == list(range(7))  # chunk 7 is done: not decoded again
    assert chunks[-1].items[-1] == LabItem(b"k0447", "n447", "src", None, b"x")


def test_fitted_chunk_coder_round_trip_and_cheap_size():
    """FittedChunk's registered coder gives back the chunk (pixels writable), and sizes it from its
    fields, without encoding the pixels (Beam's counters size sampled elements)."""
    import apache_beam as beam

    from imagebeam.transforms.inputs.sources import Failure

    coder = beam.coders.registry.get_coder(FittedChunk)
    assert isinstance(coder, lab_shards.FittedChunkCoder)
    good = chunk_of(3, 9)
    fitted = FittedChunk(good.chunk, good.items, good.rgb, (Failure("a.tar", "m/x.JPEG", "truncated image data"),))
    back = coder.decode(coder.encode(fitted))
    assert back.chunk == fitted.chunk and back.items == fitted.items and back.failures == fitted.failures
    np.testing.assert_array_equal(back.rgb, fitted.rgb)
    back.rgb[0, 0, 0] = 1  # writable, as the decoded chunk of the fit step is
    empty = FittedChunk(good.chunk, (), np.empty((0, 299, 299, 3), np.uint8), fitted.failures)
    assert coder.decode(coder.encode(empty)).rgb.shape == (0, 299, 299, 3)
    estimate = coder.estimate_size(fitted)
    assert fitted.rgb.nbytes <= estimate <= len(coder.encode(fitted)) + 1024


def test_a_bucket_whose_chunks_are_all_done_is_not_read_again(tmp_path):
    """ChunkMerger.finished: None while a chunk of the bucket has no marker; once all have one, their
    recorded outputs, so staging's merge gives them without reading the bucket's staged images."""
    from apache_beam import pvalue

    from imagebeam.transforms.bookkeeping import staging as stage
    from imagebeam.transforms.bookkeeping.staging import BucketTask

    staging = str(tmp_path)
    merger = lab_shards.ChunkMerger(4, staging)
    task = BucketTask(0, (("no-such-run", 0, 10),), 10, 0, 10)  # 10 entries: chunks 0, 1, 2
    for index in (0, 2):
        lab_shards._WritePiecesFn(staging).process((chunk_of(1, index), None)).__next__()
    assert merger.finished(task) is None
    list(lab_shards._WritePiecesFn(staging).process((chunk_of(1, 1), None)))
    done = merger.finished(task)
    assert [(o.tag, o.value.chunk) for o in done] == [(lab_shards.DONE, i) for i in range(3)]
    # the merge step takes them as they are: the run file named in the task does not exist
    out = list(stage._MergeFn(staging, merger, resumable=False).process(task))
    assert [o.value for o in out] == [o.value for o in done] and all(isinstance(o, pvalue.TaggedOutput) for o in out)
