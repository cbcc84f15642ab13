"""Every kind of `--input` as one source: image tars, shards and folders, and URL lists fetched on the fly.

Two steps. `IndexAllInputs` lists what is there without reading any image: work units of the image
sources, entries of the URL lists, the class keys (the sorted-class label map) and a per-unit estimate
of the number of images (to size buckets). Then `StageFromIndex` stages every image in sorted runs on disk
(transforms/bookkeeping/staging.py), for the jobs that order the whole dataset (downsample, colorize).
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.inputs.downloads import FetchImages
from imagebeam.transforms.inputs.fetch import FetchConfig
from imagebeam.transforms.inputs.sources import IndexInputs, class_keys, estimated_images
from imagebeam.transforms.bookkeeping.staging import DEFAULT_STAGE_MEMORY_MB, ItemFn, StageStream, StageUnits
from imagebeam.transforms.inputs.url_lists import ReadUrlLists, is_url_list


class Indexed(NamedTuple):
    units: Optional[beam.PCollection]     # WorkUnits and index failures of the image sources
    entries: Optional[beam.PCollection]   # UrlEntry of the URL lists
    class_keys: beam.PCollection          # str, possibly repeated
    estimates: beam.PCollection           # int per work unit or URL


def split_inputs(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(image sources, URL lists), by file name (a .tgz by whether it holds a text list)."""
    images, lists = [], []
    for path in inputs:
        (lists if is_url_list(path) else images).append(path)
    return images, lists


def _flatten(pcolls: List[beam.PCollection], label: str):
    return pcolls[0] if len(pcolls) == 1 else tuple(pcolls) | label >> beam.Flatten()


class IndexAllInputs(beam.PTransform):
    """`--input` paths -> Indexed. URL lists need a FetchConfig (the network options of the job)."""

    def __init__(self, inputs: Sequence[str], fetch_config: Optional[FetchConfig] = None,
                 columns: Tuple[str, Optional[str], Optional[str]] = ("url", None, None)):
        super().__init__()
        self._images, self._lists = split_inputs(inputs)
        if self._lists and fetch_config is None:
            raise ValueError(f"URL lists {self._lists} given to a job without network options")
        self.fetch_config, self._columns = fetch_config, columns

    def expand(self, pbegin) -> Indexed:
        units = entries = None
        keys, estimates = [], []
        if self._images:
            units = pbegin | "IndexInputs" >> IndexInputs(self._images)
            keys.append(units | "ClassKeys" >> beam.FlatMap(class_keys).with_output_types(str))
            estimates.append(units | "EstimateImages" >> beam.Map(estimated_images))
        if self._lists:
            entries = pbegin | "ReadUrlLists" >> ReadUrlLists(self._lists, *self._columns)
            keys.append(entries | "ListLabels" >> beam.FlatMap(lambda e: [e.label] if e.label else [])
                        .with_output_types(str))
            estimates.append(entries | "OnePerUrl" >> beam.Map(lambda _: 1))
        return Indexed(units, entries, _flatten(keys, "AllClassKeys"), _flatten(estimates, "AllEstimates"))


class StageFromIndex(beam.PTransform):
    """`Indexed` (given here; apply to the pipeline) -> (summaries, failure sets): every image staged in
    sorted runs (transforms/bookkeeping/staging.py). The failure sets are a tuple of PCollections, not
    flattened: WriteFailures sorts each where it is produced.

    Image sources are staged work unit by work unit (a re-run skips finished units); fetched URL-list
    images, which cannot be read again, are staged as they arrive. `memory_mb`: staged bytes a worker
    holds before it writes a run (`--stage-memory`).
    """

    def __init__(self, indexed: Indexed, staging: str, item_fn: ItemFn, params: str,
                 side_inputs: Sequence[Any] = (), fetch_config: Optional[FetchConfig] = None,
                 progress: Optional[str] = None, memory_mb: int = DEFAULT_STAGE_MEMORY_MB):
        super().__init__()
        self._indexed, self._memory_mb = indexed, memory_mb
        self._staging, self._item_fn, self._params = staging, item_fn, params
        self._side, self._config, self._progress = list(side_inputs), fetch_config, progress

    def expand(self, pbegin):
        indexed = self._indexed
        summaries, failures = [], []
        if indexed.units is not None:
            s, f = indexed.units | "StageUnits" >> StageUnits(self._staging, self._item_fn, self._params,
                                                              self._side, self._progress, self._memory_mb)
            summaries.append(s)
            failures.append(f)
        if indexed.entries is not None:
            s, f = (indexed.entries
                    | "FetchImages" >> FetchImages(self._config, FileSystems.join(self._staging, "urls"))
                    | "StageFetched" >> StageStream(self._staging, self._item_fn, self._side, self._progress,
                                                     self._memory_mb))
            summaries.append(s)
            failures.append(f)
        return _flatten(summaries, "AllSummaries"), tuple(failures)
