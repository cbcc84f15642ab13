"""The Inception-ResNet-v2 embedding as a Beam RunInference step over ordered chunks.

The model handler's example is a `Chunk` (up to `--batch-size` consecutive images of one bucket, made by
`lab_shards.ChunkMerger`) and one model call embeds a whole chunk. Batches are formed upstream on
purpose: a float result can depend on the batch it was computed in, and a chunk holds the same images
whatever the runner, bundle sizes or worker count, so the embeddings (and the files) repeat bit for bit.

Keras and its backend (`--embedding-backend`: TensorFlow, JAX or PyTorch) are imported only in
`load_model`, on the workers: the launching process stays free of them (see
`pipelines.options.run_pipeline`). The model is loaded once per process (RunInference's shared handle),
or as `--model-copies` copies shared across the processes of a worker (GPU machines). The chunk goes to
the model as RGB uint8; grey and scaling happen on the device (`embedding_backends`).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from imagebeam.transforms.imaging import colour
from imagebeam.transforms.model.embedding_backends import BACKENDS, Embedder, embedder
from imagebeam.transforms.model.inception import PRECISIONS
from imagebeam.transforms.formats.lab_shards import FittedChunk
from imagebeam.transforms.inputs.sources import Failure

_LOG = logging.getLogger(__name__)


class InceptionChunkHandler(ModelHandler[FittedChunk, PredictionResult, Any]):
    """RunInference handler: FittedChunk -> PredictionResult(chunk, float32 embeddings [len(chunk), E])."""

    def __init__(self, weights: str, precision: str = "float32", model_copies: Optional[int] = None,
                 backend: str = "tensorflow", compile: str = "auto", batch_size: Optional[int] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        # One chunk per call: the chunk already is the batch (see the module docstring).
        super().__init__(min_batch_size=1, max_batch_size=1, model_copies=model_copies)
        self._weights, self._precision, self._backend, self._compile = weights, precision, backend, compile
        self._batch_size = batch_size

    def load_model(self) -> Embedder:
        return embedder(self._weights, self._precision, self._backend, self._compile, self._batch_size)

    def run_inference(self, batch: Sequence[FittedChunk], model: Embedder,
                      inference_args: Optional[dict] = None) -> Iterable[PredictionResult]:
        for fitted in batch:  # a chunk none of whose images decoded has nothing to embed
            yield PredictionResult(fitted, model(fitted.rgb) if len(fitted.rgb) else None, self._weights)

    def get_num_bytes(self, batch: Sequence[FittedChunk]) -> int:
        return sum(fitted.rgb.nbytes for fitted in batch)

    def get_metrics_namespace(self) -> str:
        return "imagebeam_inception"


def embed_direct(model, rgb299: np.ndarray) -> np.ndarray:
    """The SPEC §3 embedding of RGB 299 images (n, 299, 299, 3) with a Keras model, without Beam: the
    numpy reference of what `Embedder` computes on the device."""
    grey = colour.grey_uint8(rgb299)
    return np.asarray(model(colour.inception_input(grey), training=False), dtype=np.float32)


def _failed_chunk(element) -> Iterable[Failure]:
    batch, exc = element
    for fitted in batch:
        yield from fitted.failures  # did not decode: the chunk never reaches its marker, which records them
        for item in fitted.items:
            yield Failure(item.source, item.member, f"embedding failed: {type(exc).__name__}: {exc}")


class EmbedChunks(beam.PTransform):
    """FittedChunks -> ((fitted chunk, embeddings [n, E]), failures). A chunk whose model call raises becomes
    failures of its images (reason given) and the pipeline goes on."""

    def __init__(self, weights: str, precision: str = "float32", model_copies: Optional[int] = None,
                 backend: str = "tensorflow", compile: str = "auto", batch_size: Optional[int] = None):
        super().__init__()
        self._handler = InceptionChunkHandler(weights, precision, model_copies, backend, compile, batch_size)

    def expand(self, chunks) -> Tuple[beam.PCollection, beam.PCollection]:
        main, dead = chunks | "RunInference" >> RunInference(self._handler).with_exception_handling()
        embedded = main | "WithEmbeddings" >> beam.Map(lambda r: (r.example, r.inference)).with_output_types(
            Tuple[FittedChunk, Any])
        failures = dead.failed_inferences | "FailedChunks" >> beam.FlatMap(_failed_chunk)
        return embedded, failures
