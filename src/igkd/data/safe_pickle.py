"""Read data pickles (the CIFAR python release) without running code from them.

``pickle.load`` calls whatever callable a file names, so a hostile ``batches.meta`` can run
a shell command. :func:`load_data_pickle` allows only what the official CIFAR files are
made of: builtin containers, bytes and numbers (handled by the pickle machine itself),
numpy array reconstruction, and ``_codecs.encode(text, "latin1")`` (how Python 3 writes
bytes at protocol 2). Any other global is refused before it is looked up, so nothing runs.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from ..errors import UserError

try:  # numpy >= 2 keeps these in numpy._core; older pickles name numpy.core (a shim in numpy 2)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _ndarray_only(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return _multiarray._reconstruct(subtype, shape, dtype)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_only,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_only,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file never needs") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a data file never needs")


def load_data_pickle(path: Path, what: str, fix: str):
    """Unpickle ``path`` (``encoding="bytes"``, as the CIFAR release needs) allowing data only.

    ``what`` names the file's kind in errors ("CIFAR-10 batch"); ``fix`` says how to repair it."""
    try:
        with open(path, "rb") as f:
            obj = _DataUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a plain {what} ({e}); nothing in it was run; {fix}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError) as e:
        raise UserError(f"{path} is not a valid {what} ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UserError(f"{path} is not a valid {what} (object array); {fix}")
    return obj
