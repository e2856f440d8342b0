"""Trusted pickles meet an allow-list before they are unpickled: a corpus of known-bad reducers is refused.

The corpus follows the callables that public pickle-scanner test suites (picklescan, fickling, ModelScan)
use for malicious samples, and the one this project was shown to miss (multiprocessing.util.spawnv_passfds).
Each is written as a protocol-0 GLOBAL and as a protocol-4 STACK_GLOBAL pickle, by hand, so building the
corpus runs none of it either.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from shipyard.errors import UnsafeModelError
from shipyard.pipeline._picklescan import allowed, refuse_untrusted_globals

pytest.importorskip("picklescan")

KNOWN_BAD = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("os", "popen"), ("os", "execv"),
    ("subprocess", "Popen"), ("subprocess", "run"), ("subprocess", "check_output"), ("subprocess", "call"),
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "compile"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("builtins", "open"), ("builtins", "apply"), ("__builtin__", "eval"),
    ("runpy", "_run_code"), ("runpy", "run_path"), ("runpy", "run_module"),
    ("multiprocessing.util", "spawnv_passfds"), ("_posixsubprocess", "fork_exec"), ("pty", "spawn"),
    ("webbrowser", "open"), ("bdb", "Bdb.run"), ("pdb", "Pdb.run"), ("timeit", "timeit"),
    ("code", "InteractiveInterpreter.runsource"), ("operator", "attrgetter"), ("operator", "methodcaller"),
    ("functools", "partial"), ("importlib", "import_module"), ("pickle", "loads"), ("_pickle", "loads"),
    ("marshal", "loads"), ("types", "FunctionType"), ("ctypes", "CDLL"), ("shutil", "rmtree"),
    ("socket", "create_connection"), ("asyncio", "create_subprocess_exec"), ("requests.api", "get"),
    ("numpy.testing._private.utils", "runstring"), ("numpy", "load"), ("torch.hub", "load"), ("torch", "load"),
    ("torch.utils.bottleneck.__main__", "main"), ("antigravity", "fly"), ("this", "s"),
]  # fmt: skip


def _protocol_0(module: str, name: str, arg: str) -> bytes:
    return f"c{module}\n{name}\n(S'{arg}'\ntR.".encode()


def _protocol_4(module: str, name: str, arg: str) -> bytes:
    def text(value: str) -> bytes:
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw + b"\x94"  # SHORT_BINUNICODE, MEMOIZE

    return b"\x80\x04" + text(module) + text(name) + b"\x93\x94" + text(arg) + b"\x85\x94R\x94."


@pytest.mark.parametrize("encode", [_protocol_0, _protocol_4])
@pytest.mark.parametrize(("module", "name"), KNOWN_BAD)
def test_known_bad_reducers_are_refused(tmp_path: Path, module: str, name: str, encode: object) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.pkl"
    path.write_bytes(encode(module, name, f"touch {marker}"))  # type: ignore[operator]
    with pytest.raises(UnsafeModelError, match=f"would import {module}.{name}"):
        refuse_untrusted_globals(path, tmp_path)
    assert not marker.exists()


def test_model_state_is_allowed(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(0).standard_normal((40, 3))
    fitted = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, (x[:, 0] > 0).astype(int))
    path = tmp_path / "pipe.pkl"
    path.write_bytes(pickle.dumps({"model": fitted, "rng": np.random.default_rng(1)}, protocol=4))
    refuse_untrusted_globals(path, tmp_path)  # sklearn classes, numpy reconstructors and generators: allowed
    assert allowed("torch._utils", "_rebuild_tensor_v2", tmp_path)
    assert allowed("collections", "OrderedDict", tmp_path)
    assert not allowed("sklearn.utils", "check_array", tmp_path)  # a function of an allowed package


def test_only_the_users_own_classes_are_allowed(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text("class Net:\n    pass\n\ndef build():\n    return Net()\n")
    assert allowed("mymodel", "Net", tmp_path)
    assert not allowed("mymodel", "build", tmp_path)  # a function, even in the user's code
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert not allowed("mymodel", "Net", elsewhere)  # not under this spec's folder
    assert not allowed("email.message", "Message", tmp_path)  # a class, but from outside the allowed packages


def test_a_torch_archive_with_a_bad_reducer_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import multiprocessing.util

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (multiprocessing.util.spawnv_passfds, ("/bin/sh", ["sh", "-c", f"touch {tmp_path}/ran"], ()))

    torch.save({"weights": torch.zeros(2), "extra": Payload()}, tmp_path / "model.pt")
    with pytest.raises(UnsafeModelError, match=r"would import multiprocessing\.util\.spawnv_passfds"):
        refuse_untrusted_globals(tmp_path / "model.pt", tmp_path)
    assert not (tmp_path / "ran").exists()
