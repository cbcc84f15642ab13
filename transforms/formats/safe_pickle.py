"""Load the pickles datasets come in (CIFAR, Imagenet32/64) without letting them run code.

A pickle is a small program: its GLOBAL / STACK_GLOBAL opcodes import any callable by name and its
REDUCE opcode calls it, so `pickle.load` on a downloaded or shared file can run `os.system(...)`.
The files this project reads only ever need plain containers, `collections.OrderedDict` and numpy's
own reconstruction helpers, so `SafeUnpickler.find_class` resolves exactly those names (from a fixed
table, never by importing what the pickle names) and refuses everything else with
`UnsafePickleError` *before* it is called. Persistent ids (`persistent_load`) are refused as well.

Allowed globals (`ALLOWED_GLOBALS` lists them):

- `builtins` (Python 2: `__builtin__`, including `xrange`, `unicode`, `long`): dict, list, tuple, set,
  frozenset, bytes, bytearray, str, int, float, complex, bool, slice, range;
- `collections.OrderedDict`;
- `_codecs.encode`, restricted to str -> latin-1 bytes (how Python 3 writes bytes at protocols 0..2);
- numpy: `ndarray`, `dtype`, `multiarray._reconstruct`, `multiarray.scalar` (protocols 0..5) and
  `numeric._frombuffer` (protocol 5), each under both `numpy.core.*` (numpy 1.x, Python 2 pickles)
  and `numpy._core.*` (numpy 2.x) module names.

`copyreg._reconstructor` is refused: numpy's types define their own `__reduce__` and no numpy or
dataset pickle uses it (checked for protocols 0..5), while it can instantiate arbitrary classes.

CIFAR's python files are Python 2 pickles: load them with `encoding="bytes"` (keys become
`b"data"`, ...) or `encoding="latin1"` (str keys). Imagenet32/64 batches written by this project
are Python 3 pickles with str keys (`data`, `labels`, `mean`).
"""
from __future__ import annotations

import builtins
import collections
import io
import pickle
from typing import IO, Any, Callable, Dict, Tuple

import numpy as np

__all__ = ["UnsafePickleError", "SafeUnpickler", "ALLOWED_GLOBALS", "load", "loads"]


class UnsafePickleError(ValueError):
    """The pickle refers to a global outside the allow list (or a persistent id); it was not run."""


_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso_8859_1",
                           "l1"})


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as Python 3 pickles use it for bytes (protocols 0..2): str -> latin-1 only."""
    if not isinstance(obj, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1_NAMES:
        raise UnsafePickleError(
            f"refused pickle call _codecs.encode(<{type(obj).__name__}>, {encoding!r}): only str -> "
            "latin-1 (how Python 3 pickles bytes) is allowed. The pickle was refused and nothing in it "
            "was executed.")
    if errors != "strict":
        raise UnsafePickleError(f"refused pickle call _codecs.encode(..., errors={errors!r}). The pickle "
                                "was refused and nothing in it was executed.")
    return obj.encode("latin-1")


def _numpy_helpers() -> Tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """numpy's pickle helpers, taken from wherever this numpy keeps them (no legacy-shim import)."""
    if int(np.__version__.split(".", 1)[0]) >= 2:
        from numpy._core import multiarray, numeric
    else:  # numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray._reconstruct, multiarray.scalar, numeric._frombuffer


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    table: Dict[Tuple[str, str], Any] = {}
    for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
                 "float", "complex", "bool", "slice", "range"):
        table[("builtins", name)] = getattr(builtins, name)
    table[("collections", "OrderedDict")] = collections.OrderedDict
    table[("_codecs", "encode")] = _latin1_encode
    reconstruct, scalar, frombuffer = _numpy_helpers()
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


_ALLOWED = _allowed_globals()
#: The (module, name) pairs a pickle may refer to, as written by Python 3 (Python 2 names map onto them).
ALLOWED_GLOBALS = frozenset(_ALLOWED)

# Python 2 spellings (what pickle's fix_imports would translate), restricted to allowed targets.
_PY2_MODULES = {"__builtin__": "builtins"}
_PY2_NAMES = {("__builtin__", "xrange"): ("builtins", "range"),
              ("__builtin__", "unicode"): ("builtins", "str"),
              ("__builtin__", "long"): ("builtins", "int")}

_REFUSED_WHY = {
    ("copyreg", "_reconstructor"): " (it can instantiate arbitrary classes, and no numpy or dataset "
                                   "pickle needs it)",
    ("copy_reg", "_reconstructor"): " (it can instantiate arbitrary classes, and no numpy or dataset "
                                    "pickle needs it)",
}


class SafeUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` that resolves only `ALLOWED_GLOBALS` and refuses persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        key = _PY2_NAMES.get((module, name)) or (_PY2_MODULES.get(module, module), name)
        try:
            return _ALLOWED[key]
        except KeyError:
            pass
        why = _REFUSED_WHY.get((module, name), "")
        raise UnsafePickleError(
            f"refused pickle global {module}.{name}: not on the allow list of "
            f"imagebeam.transforms.formats.safe_pickle (plain containers, collections.OrderedDict, numpy "
            f"arrays/scalars/dtypes){why}. The pickle was refused and nothing in it was executed.")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"refused pickle persistent id {pid!r}: persistent ids are not allowed. The pickle was "
            "refused and nothing in it was executed.")


def load(f: IO[bytes], *, encoding: str = "bytes") -> Any:
    """`pickle.load` restricted to `ALLOWED_GLOBALS`.

    `encoding` is how Python 2 `str` values are decoded: "bytes" keeps them as bytes (CIFAR keys become
    b"data"), "latin1" gives str; numpy arrays from Python 2 load with either. Python 3 pickles ignore it.
    Raises `UnsafePickleError` (a ValueError) for any other global or a persistent id.
    """
    return SafeUnpickler(f, encoding=encoding).load()


def loads(data: bytes, *, encoding: str = "bytes") -> Any:
    """`pickle.loads` restricted to `ALLOWED_GLOBALS`; see `load`."""
    return load(io.BytesIO(data), encoding=encoding)
