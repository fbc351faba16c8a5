"""Fast import of TVM's TVMScript-parsed tensor intrinsics (``tvm.s_tir.tensor_intrin``).

Needed before a tensor-core trace can be parsed or replayed (it names registered intrinsics), by
the database reader, the builder workers and the LLM-aware design spaces.
"""

from __future__ import annotations

import contextlib
import inspect
import sys


@contextlib.contextmanager
def _memoized_getmodule():
    """Memoize ``inspect.getmodule`` misses while TVMScript parses many functions.

    The TVMScript parser calls ``inspect.stack()`` per function; for every frame of a file that
    is no module (``<frozen importlib._bootstrap>`` ...) ``inspect.getmodule`` rescans all of
    ``sys.modules``. Importing ``tvm.s_tir.tensor_intrin`` (≈250 functions, done by MetaSchedule's
    ``TuneContext`` and by its builder) then costs ~30 s of CPU instead of ~2 s. A miss is only
    re-checked when ``sys.modules`` changed size, so results are unchanged.
    """
    orig = inspect.getmodule
    misses: dict[str, int] = {}

    def getmodule(obj, _filename=None):
        if _filename is None or hasattr(obj, "__module__") or hasattr(obj, "__name__"):
            return orig(obj, _filename)
        if misses.get(_filename) == len(sys.modules):
            return None
        found = orig(obj, _filename)
        if found is None:
            misses[_filename] = len(sys.modules)
        return found

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = orig


def preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (tensor-core intrinsics) quickly; idempotent."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _memoized_getmodule():
        import tvm.s_tir.tensor_intrin  # noqa: F401
