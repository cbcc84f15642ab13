"""safe_pickle: CIFAR (Python 2) and Imagenet32 (Python 3) pickles load; code-running pickles are refused."""
import collections
import io
import os
import pickle
import pickletools
import shlex
import struct
import subprocess

import numpy as np
import pytest

from imagebeam.transforms.formats import safe_pickle
from imagebeam.transforms.formats.safe_pickle import UnsafePickleError


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for CIFAR: bytes/str as BINSTRING opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _binstring(self, raw):
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<I", len(raw)) + raw)

    def save_bytes(self, obj):
        self._binstring(obj)
        self.memoize(obj)

    def save_py2_str(self, obj):  # a Python 2 str is bytes on disk
        self._binstring(obj.encode("latin-1"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_py2_str


def py2_dumps(obj) -> bytes:
    """A Python-2-style protocol 2 pickle, with numpy 1.x module names, as the CIFAR python files are."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    for helper in (b"_reconstruct", b"scalar"):
        data = data.replace(b"cnumpy._core.multiarray\n" + helper + b"\n",
                            b"cnumpy.core.multiarray\n" + helper + b"\n")
    return data


def globals_in(data: bytes):
    """(module, name) of every global a pickle looks up, as the unpickler is asked for them."""
    found = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.append((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data), encoding="bytes").load()
    return found


def opcodes_in(data: bytes):
    return {op.name for op, _, _ in pickletools.genops(data)}


def cifar_batch(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
        b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        b"filenames": [f"bos_taurus_s_{i:06d}.png".encode() for i in range(n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def as_str_keys(d):
    """What encoding='latin1' makes of a Python 2 pickle: every py2 str (bytes here) becomes str."""
    def conv(v):
        if isinstance(v, bytes):
            return v.decode("latin-1")
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v
    return {conv(k): conv(v) for k, v in d.items()}


def assert_batch_equal(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert isinstance(got[k], np.ndarray) and got[k].dtype == v.dtype
            np.testing.assert_array_equal(got[k], v)
        else:
            assert got[k] == v and type(got[k]) is type(v)


# --- what loads --------------------------------------------------------------------------------------


def test_python2_cifar_pickle_loads_with_bytes_and_latin1():
    batch = cifar_batch()
    data = py2_dumps(batch)
    ops = opcodes_in(data)
    assert "BINSTRING" in ops and "SHORT_BINSTRING" in ops  # Python 2 str opcodes, as in the real files
    assert ("numpy.core.multiarray", "_reconstruct") in globals_in(data)
    assert_batch_equal(safe_pickle.loads(data, encoding="bytes"), batch)
    assert_batch_equal(safe_pickle.loads(data), batch)  # bytes is the default
    assert_batch_equal(safe_pickle.loads(data, encoding="latin1"), as_str_keys(batch))
    # the same as what plain pickle makes of it
    assert_batch_equal(safe_pickle.loads(data, encoding="bytes"), pickle.loads(data, encoding="bytes"))


def test_python3_protocol2_pickle_with_codecs_encode_loads():
    batch = cifar_batch(4, seed=1)
    data = pickle.dumps(batch, protocol=2)
    assert ("_codecs", "encode") in globals_in(data)
    for encoding in ("bytes", "latin1"):  # real bytes objects stay bytes either way
        assert_batch_equal(safe_pickle.loads(data, encoding=encoding), batch)


def test_python2_meta_and_load_from_file(tmp_path):
    meta = {b"fine_label_names": [b"apple", b"aquarium_fish"], b"coarse_label_names": [b"fish"]}
    path = tmp_path / "meta"
    path.write_bytes(py2_dumps(meta))
    with open(path, "rb") as f:
        assert safe_pickle.load(f, encoding="bytes") == meta
    with open(path, "rb") as f:
        assert safe_pickle.load(f, encoding="latin1") == as_str_keys(meta)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_imagenet32_batch_loads(protocol):
    rng = np.random.default_rng(protocol)
    batch = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
             "labels": [1, 1000, 490, 361, 171, 822],
             "mean": rng.random(3072) * 255}
    data = pickle.dumps(batch, protocol=protocol)
    if protocol == 5:
        assert ("numpy._core.numeric", "_frombuffer") in globals_in(data)
    for encoding in ("bytes", "latin1"):
        assert_batch_equal(safe_pickle.loads(data, encoding=encoding), batch)


ALLOWED_VALUES = [
    np.arange(6, dtype=np.uint8).reshape(2, 3), np.arange(3, dtype=np.int64), np.linspace(0, 1, 4, dtype=np.float32),
    np.linspace(0, 1, 4), np.array([True, False]), np.asfortranarray(np.arange(6).reshape(2, 3)),
    np.zeros((0, 3072), np.uint8), np.uint8(7), np.int64(-3), np.float32(1.5), np.float64(2.5), np.bool_(True),
    np.dtype("uint8"), np.array(["ab", "c"]), np.array([(1, 2.0)], dtype=[("a", "u1"), ("b", "<f4")]),
    collections.OrderedDict(a=1, b=[2]), {1, 2}, frozenset({3}), bytearray(b"xy"), b"", b"abc", "text",
    slice(1, 5, 2), range(2, 9), complex(1, 2), 10 ** 30, 1.25, True, None, (1, "a"), [1, b"b"], {"k": (1,)},
]


@pytest.mark.parametrize("protocol", range(0, 6))
def test_allowed_values_round_trip_like_plain_pickle(protocol):
    for value in ALLOWED_VALUES:
        data = pickle.dumps(value, protocol=protocol)
        for encoding in ("bytes", "latin1"):
            got, want = safe_pickle.loads(data, encoding=encoding), pickle.loads(data, encoding=encoding)
            assert type(got) is type(want), (value, protocol)
            if isinstance(want, np.ndarray):
                assert got.dtype == want.dtype and got.shape == want.shape
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want, (value, protocol)


def test_python2_numpy_scalars_and_arrays():
    value = {b"x": np.float64(2.5), b"n": np.int64(7), b"a": np.arange(5, dtype=np.float32)}
    data = py2_dumps(value)
    assert ("numpy.core.multiarray", "scalar") in globals_in(data)
    for encoding in ("bytes", "latin1"):
        got = safe_pickle.loads(data, encoding=encoding)
        key = (lambda k: k) if encoding == "bytes" else (lambda k: k.decode())
        assert got[key(b"x")] == np.float64(2.5) and type(got[key(b"x")]) is np.float64
        assert got[key(b"n")] == 7 and type(got[key(b"n")]) is np.int64
        np.testing.assert_array_equal(got[key(b"a")], value[b"a"])


def test_allow_list_is_what_the_docs_say():
    assert ("numpy.core.multiarray", "_reconstruct") in safe_pickle.ALLOWED_GLOBALS
    assert ("numpy._core.multiarray", "_reconstruct") in safe_pickle.ALLOWED_GLOBALS
    assert ("builtins", "eval") not in safe_pickle.ALLOWED_GLOBALS
    assert ("copyreg", "_reconstructor") not in safe_pickle.ALLOWED_GLOBALS
    assert all(m in ("builtins", "collections", "_codecs") or m.startswith("numpy")
               for m, _ in safe_pickle.ALLOWED_GLOBALS)


# --- what is refused ---------------------------------------------------------------------------------


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_payloads(sentinel: str):
    import builtins
    quoted = shlex.quote(sentinel)
    return {
        "os.system": _Reduce(os.system, (f"touch {quoted}",)),
        "builtins.eval": _Reduce(builtins.eval, (f"open({sentinel!r}, 'w').close()",)),
        "builtins.exec": _Reduce(builtins.exec, (f"open({sentinel!r}, 'w').close()",)),
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", sentinel],)),
    }


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("which", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
def test_code_running_pickles_are_refused_and_do_not_run(tmp_path, which, protocol):
    sentinel = str(tmp_path / "SENTINEL")
    payload = {"data": np.zeros((1, 3072), np.uint8), "labels": [1], "evil": _touch_payloads(sentinel)[which]}
    data = pickle.dumps(payload, protocol=protocol)
    for encoding in ("bytes", "latin1"):
        with pytest.raises(UnsafePickleError) as err:
            safe_pickle.loads(data, encoding=encoding)
        message = str(err.value)
        assert "refused" in message and "nothing in it was executed" in message
        module, name = which.split(".")
        assert f".{name}" in message  # os.system is pickled as posix.system on Linux
    assert isinstance(err.value, ValueError)
    assert not os.path.exists(sentinel)


def test_payloads_really_run_under_plain_pickle(tmp_path):
    """Control: the payloads above are live, so their absence after safe_pickle means something."""
    sentinel = str(tmp_path / "SENTINEL")
    for which in ("os.system", "builtins.eval"):
        pickle.loads(pickle.dumps(_touch_payloads(sentinel)[which], protocol=2))
        assert os.path.exists(sentinel), which
        os.remove(sentinel)


def _protocol0_call(module: str, name: str, *args: str) -> bytes:
    """module.name(*args) as a hand-written protocol 0 pickle (str arguments)."""
    return (f"c{module}\n{name}\n(" + "".join(f"V{a}\n" for a in args) + "tR.").encode("raw_unicode_escape")


def _stack_global(module: str, name: str) -> bytes:
    """A protocol 4 pickle that only looks up module.name (dotted names allowed at protocol 4)."""
    enc = [s.encode() for s in (module, name)]
    body = b"".join(pickle.SHORT_BINUNICODE + bytes([len(s)]) + s for s in enc)
    return pickle.PROTO + b"\x04" + body + pickle.STACK_GLOBAL + pickle.STOP


@pytest.mark.parametrize("module,name,args", [
    ("builtins", "getattr", ()),                 # getattr(__import__('os'), 'system')(...)
    ("builtins", "__import__", ("os",)),
    ("builtins", "eval", ("1+1",)),
    ("__builtin__", "eval", ("1+1",)),           # the Python 2 spelling
    ("__builtin__", "reduce", ()),               # what fix_imports would map to functools.reduce
    ("posix", "system", ("true",)),
    ("numpy", "load", ("/etc/passwd",)),
    ("numpy", "frombuffer", ("abc",)),
    ("numpy", "fromfile", ("/etc/passwd",)),
    ("numpy.lib.npyio", "load", ("/etc/passwd",)),
    ("numpy.dtypes", "UInt8DType", ()),
    ("copyreg", "_reconstructor", ()),
    ("copy_reg", "_reconstructor", ()),
    ("collections", "namedtuple", ("T", "a")),
])
def test_globals_off_the_allow_list_are_refused(module, name, args):
    for data in (_protocol0_call(module, name, *args), _stack_global(module, name)):
        with pytest.raises(UnsafePickleError, match=f"{module}\\.{name}"):
            safe_pickle.loads(data)


def test_getattr_chain_payload_is_refused(tmp_path):
    sentinel = str(tmp_path / "SENTINEL")
    # builtins.getattr(builtins.__import__('os'), 'system')('touch <sentinel>')
    data = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + f"touch {shlex.quote(sentinel)}".encode() + b"\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.getattr"):
        safe_pickle.loads(data)
    assert not os.path.exists(sentinel)


@pytest.mark.parametrize("name", ["dict.fromkeys", "str.join", "int.__subclasses__", "ndarray.tofile"])
def test_dotted_attribute_lookups_are_refused(name):
    module = "numpy" if name.startswith("ndarray") else "builtins"
    with pytest.raises(UnsafePickleError):
        safe_pickle.loads(_stack_global(module, name))


def test_codecs_encode_only_str_to_latin1():
    assert safe_pickle.loads(_protocol0_call("_codecs", "encode", "ab\u00ff", "latin1")) == b"ab\xff"
    for encoding in ("rot13", "utf-8", "zlib"):
        with pytest.raises(UnsafePickleError, match="_codecs.encode"):
            safe_pickle.loads(_protocol0_call("_codecs", "encode", "abc", encoding))


def test_persistent_ids_are_refused():
    class WithIds(pickle.Pickler):
        def persistent_id(self, obj):
            return "ext-1" if obj == "external" else None

    buf = io.BytesIO()
    WithIds(buf, protocol=2).dump(["external"])
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_pickle.loads(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_pickle.loads(b"Pext-1\n.")  # protocol 0 PERSID
