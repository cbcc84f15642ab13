"""Every kind of `--input` as one source: image tars, shards and folders, and URL lists fetched on the fly.

Jobs get four PCollections: the image blobs, the failures of reading/fetching, the class keys known
before any image is read (tar and folder names, URL list labels: the sorted-class label map) and a
per-unit estimate of the number of images (to size shuffle buckets).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

from imagebeam.transforms.downloads import FetchImages
from imagebeam.transforms.fetch import FetchConfig
from imagebeam.transforms.sources import IndexInputs, ReadImages, class_keys, estimated_images
from imagebeam.transforms.url_lists import ReadUrlLists, is_url_list


class Inputs(NamedTuple):
    blobs: beam.PCollection
    failures: beam.PCollection
    class_keys: beam.PCollection   # str, possibly repeated
    estimates: beam.PCollection    # int per work unit or URL


def split_inputs(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(image sources, URL lists), by file name (a .tgz by whether it holds a text list)."""
    images, lists = [], []
    for path in inputs:
        (lists if is_url_list(path) else images).append(path)
    return images, lists


class ReadInputs(beam.PTransform):
    """`--input` paths -> Inputs. URL lists need a FetchConfig (the network options of the job)."""

    def __init__(self, inputs: Sequence[str], fetch_config: Optional[FetchConfig] = None,
                 columns: Tuple[str, Optional[str], Optional[str]] = ("url", None, None)):
        super().__init__()
        self._images, self._lists = split_inputs(inputs)
        if self._lists and fetch_config is None:
            raise ValueError(f"URL lists {self._lists} given to a job without network options")
        self._config, self._columns = fetch_config, columns

    def expand(self, pbegin) -> Inputs:
        parts = []
        if self._images:
            indexed = pbegin | "IndexInputs" >> IndexInputs(self._images)
            blobs, failures = indexed | "ReadImages" >> ReadImages()
            parts.append((blobs, failures,
                          indexed | "ClassKeys" >> beam.FlatMap(class_keys).with_output_types(str),
                          indexed | "EstimateImages" >> beam.Map(estimated_images)))
        if self._lists:
            entries = pbegin | "ReadUrlLists" >> ReadUrlLists(self._lists, *self._columns)
            blobs, failures = entries | "FetchImages" >> FetchImages(self._config)
            parts.append((blobs, failures,
                          entries | "ListLabels" >> beam.FlatMap(lambda e: [e.label] if e.label else [])
                          .with_output_types(str),
                          entries | "OnePerUrl" >> beam.Map(lambda _: 1)))
        if len(parts) == 1:
            return Inputs(*parts[0])
        return Inputs(*(tuple(group) | f"All{name}" >> beam.Flatten()
                        for name, group in zip(("Blobs", "Failures", "ClassKeys", "Estimates"), zip(*parts))))
