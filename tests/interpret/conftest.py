"""Interpreter tier: run the real Triton kernels on the CPU (``TRITON_INTERPRET=1``).

The variable must be set before triton is first imported, so this conftest sets it at import
time, and every test in this folder is marked ``interpret``. If triton is not installed the
tests of this folder are skipped.

Triton 3.6's interpreter converts scalar kernel arguments to Python ints with ``int()`` on a
one-element array, which NumPy >= 2.3 rejects ("only 0-dimensional arrays can be converted"):
any ``range(0, n)`` over a runtime ``n`` then fails. The shim below converts through
``.item()`` instead; it only touches the interpreter, never compiled kernels.
"""
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
    import triton.runtime.interpreter as _interp
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CI installs triton with the dev extra
    HAVE_TRITON = False

if HAVE_TRITON and hasattr(_interp, "_patch_lang_tensor"):
    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.interpret)
            if not HAVE_TRITON:
                item.add_marker(pytest.mark.skip(reason="triton is not installed"))
