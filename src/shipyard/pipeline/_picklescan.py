"""Check a pickle the spec trusts before unpickling it: only an allow-list of globals may be imported.

picklescan reads the pickle opcodes without running them and lists every global the file would import
(GLOBAL and STACK_GLOBAL, in plain pickles, joblib files and torch zip archives). Each must be:
- one of the reconstructors that numpy, torch, joblib and the standard library pickle their state with
  (and the `__pyx_unpickle_*` functions Cython generates to rebuild those packages' extension classes);
- a class (not a function) of numpy, scipy, scikit-learn, torch or joblib: estimators, modules, dtypes,
  storages, which unpickling only constructs and fills;
- a class defined in the user's own code under the spec's folder (a pickled `nn.Module` names its class).
Anything else (os.system, eval, subprocess, runpy, multiprocessing.util.spawnv_passfds, any function of
any other package) is refused before a byte is unpickled. Trust in the spec means "I made this file";
the check guards against a file swapped since, without a list of known-bad callables to keep up to date.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path

from shipyard._extras import require
from shipyard.errors import UnsafeModelError
from shipyard.pipeline._imports import forget_shadowed, on_sys_path

# Functions that rebuild state: arrays, scalars, random generators, tensors, parameters, objects.
RECONSTRUCTORS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer",
    "numpy.random._pickle.__randomstate_ctor", "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_qtensor", "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_wrapper_subclass",
    "copyreg._reconstructor", "_codecs.encode",
})  # fmt: skip
# Plain containers and values of the standard library.
STANDARD_TYPES = frozenset({
    "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex", "builtins.bytearray",
    "builtins.range", "builtins.object", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.bytes",
    "builtins.str", "builtins.int", "builtins.float", "builtins.bool", "builtins.type",
    "collections.OrderedDict", "collections.defaultdict", "collections.Counter", "collections.deque",
})  # fmt: skip
# Protocol 0-2 pickles (torch.save uses 2) write Python 2's module names, which unpickling maps back.
STANDARD_TYPES |= {t.replace("builtins.", "__builtin__.", 1) for t in STANDARD_TYPES if t.startswith("builtins.")}
RECONSTRUCTORS |= {"copy_reg._reconstructor"}
STATE_PACKAGES = frozenset({"numpy", "scipy", "sklearn", "torch", "joblib"})


def _lookup(module: str, name: str) -> object | None:
    try:
        value: object = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except Exception:  # an import that fails or a missing attribute: not something we can vouch for
        return None
    return value


@functools.cache
def _library_class(module: str, name: str) -> bool:
    # Importing a library's module runs only that library's code, but never a `__main__` (a script).
    if "__main__" in module.split("."):
        return False
    return module.split(".")[0] in STATE_PACKAGES and isinstance(_lookup(module, name), type)


def _in_user_code(module: str, base_dir: Path) -> bool:
    """Whether the module's top-level package or file lies under the spec's folder (checked without importing)."""
    top = module.split(".")[0]
    forget_shadowed(top, base_dir.resolve())  # a `model` cached from another spec's folder is not this one
    spec = importlib.util.find_spec(top)
    places = [spec.origin] if spec is not None and spec.origin else []
    places += list(spec.submodule_search_locations or []) if spec is not None else []
    root = base_dir.resolve()
    return bool(places) and all(Path(p).resolve().is_relative_to(root) for p in places)


def _user_class(module: str, name: str, base_dir: Path) -> bool:
    with on_sys_path(base_dir):
        # Only the user's own modules are imported here: a pickle naming `antigravity` must not run it.
        return _in_user_code(module, base_dir) and isinstance(_lookup(module, name), type)


def allowed(module: str, name: str, base_dir: Path) -> bool:
    """Whether unpickling may import `module.name`."""
    qualified = f"{module}.{name}"
    if qualified in RECONSTRUCTORS or qualified in STANDARD_TYPES:
        return True
    if module.split(".")[0] in STATE_PACKAGES:
        return name.startswith("__pyx_unpickle_") or _library_class(module, name)
    return _user_class(module, name, base_dir)


def refuse_untrusted_globals(path: Path, base_dir: Path) -> None:
    """UnsafeModelError naming every global outside the allow-list (or the file, if it cannot be read)."""
    scanner = require("picklescan.scanner", "torch", "checking trusted pickles")
    result = scanner.scan_file_path(str(path))
    if result.scan_err:
        raise UnsafeModelError(f"{path}: refused: its pickle opcodes cannot be read, so its imports are unknown")
    refused = sorted({f"{g.module}.{g.name}" for g in result.globals if not allowed(g.module, g.name, base_dir)})
    if refused:
        raise UnsafeModelError(
            f"{path}: refused even though the spec trusts pickles: it would import {', '.join(refused)}, which "
            "is not model state (only numpy/scipy/scikit-learn/torch classes, their reconstructors and your "
            "own classes are allowed; checked without unpickling)"
        )
