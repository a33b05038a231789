"""Read data pickles (the CIFAR python release) without running code from them.

``pickle.load`` calls whatever callable a file names, so a hostile ``batches.meta`` can run
a shell command. :func:`load_data_pickle` allows only what the official CIFAR files are
made of: builtin containers, bytes and numbers (handled by the pickle machine itself),
numpy arrays of plain numbers or strings, and ``_codecs.encode(text, "latin1")`` (how
Python 3 writes bytes at protocol 2). Any other global is refused before it is looked up,
so nothing runs.

Allowing numpy is not enough by itself: an array of dtype ``object`` holds raw pointers,
and a pickle that can build one from file bytes (``numpy.ndarray((1,), dtype("O"), buf)``,
or a plain dtype whose state sets the has-object flags) makes the interpreter dereference
addresses the file chose. So no numpy class is ever callable from a pickle: ``numpy.ndarray``
is accepted only as the array type argument of ``_reconstruct``, every dtype is built by a
checked constructor (numbers, bools, bytes and text only; no fields, subarrays or objects),
the state a pickle sets on a dtype or array (its BUILD opcode) is checked before it is
applied, and the loaded structure is walked at every depth for anything but data.
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

# dtype kinds a data file may hold: bool, integers, floats, complex, bytes, text. Not "O"
# (pointers), "V" (structured: fields may hide objects), "M"/"m" (need metadata state).
_KINDS = set("biufcSU")
_FLEXIBLE = set("SU")  # their pickled state carries the item size and alignment
_DATA_TYPES = (bytes, bytearray, str, int, float, complex, bool, type(None))


def _refuse(why: str):
    raise pickle.UnpicklingError(why)


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        _refuse(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _plain_dtype(d: np.dtype) -> np.dtype:
    """``d`` if it is a dtype of plain numbers or strings (no pointers, fields or subarrays)."""
    if not isinstance(d, np.dtype):
        _refuse(f"it gives a {type(d).__name__} where a numpy dtype belongs")
    if d.hasobject or d.kind not in _KINDS or d.fields is not None or d.subdtype is not None \
            or d.metadata is not None:
        _refuse(f"it uses the numpy dtype {d!r}, which a data file never needs (only numbers and strings)")
    return d


class _NdarrayType:
    """What ``numpy.ndarray`` names in a data pickle: the array type argument of
    ``_reconstruct``, never a callable (``ndarray(shape, dtype, buffer)`` reads any bytes
    as any dtype, pointers included)."""

    def __call__(self, *args, **kwargs):
        _refuse("it calls numpy.ndarray directly, which a data file never needs")


_NDARRAY = _NdarrayType()


class _DataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, so that BUILD (``obj.__setstate__(state)``) can be checked:
    the C one calls ``__setstate__`` of a numpy dtype or array without asking us. A CIFAR
    pickle has few opcodes (one bytes string per array): the official files read as fast;
    a protocol-5 re-pack (a bytearray per array) takes about 0.3 s more per 150 MB."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        # objects this load created, by id (the objects are held so an id is not reused);
        # each may be given its state once, by one BUILD
        self._fresh_dtypes: dict[int, np.dtype] = {}
        self._fresh_arrays: dict[int, np.ndarray] = {}
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): _latin1_encode,
        }

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file never needs") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it uses persistent ids, which a data file never needs")

    # -- the only constructors a pickle can call

    def _dtype(self, obj, align=False, copy=False):
        """``numpy.dtype(obj, align, copy)`` for a type string (``'u1'``, ``b'<i8'``) only.
        Always a private copy: a BUILD on numpy's shared ``dtype('u1')`` would change it
        for the whole process."""
        if isinstance(obj, bytes):
            obj = obj.decode("ascii", "replace")
        if not isinstance(obj, str):
            _refuse(f"it builds a numpy dtype from a {type(obj).__name__}, not a type string")
        d = _plain_dtype(np.dtype(obj, align=bool(align), copy=True))
        self._fresh_dtypes[id(d)] = d
        return d

    def _typecode(self, dtype) -> np.dtype:
        return self._dtype(dtype) if isinstance(dtype, (str, bytes)) else _plain_dtype(dtype)

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not _NDARRAY:
            _refuse("only plain numpy arrays are allowed")
        if shape != (0,):  # numpy always writes (0,): the data comes in the BUILD state
            _refuse(f"it reconstructs a numpy array of shape {shape!r}, which numpy never writes")
        a = _multiarray._reconstruct(np.ndarray, shape, self._typecode(dtype))
        self._fresh_arrays[id(a)] = a
        return a

    def _frombuffer(self, buf, dtype, shape, order, axis_order=None):
        # bytes from the pickle itself: an array over another array could outlive its data
        if type(buf) not in (bytes, bytearray):
            _refuse(f"it builds an array over a {type(buf).__name__}, not bytes")
        if axis_order is None:  # an older numpy's _frombuffer has no axis_order argument
            return _numeric._frombuffer(buf, self._typecode(dtype), shape, order)
        return _numeric._frombuffer(buf, self._typecode(dtype), shape, order, axis_order)

    # -- BUILD: state is applied only to a dtype or array made above, once, and checked first

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype) and self._fresh_dtypes.pop(id(inst), None) is inst:
            _check_dtype_state(inst, state)
        elif type(inst) is np.ndarray and self._fresh_arrays.pop(id(inst), None) is inst:
            _check_array_state(state)
        else:
            _refuse(f"it sets the state of a {type(inst).__name__}, which a data file never needs")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = _load_build


def _check_dtype_state(d: np.dtype, state) -> None:
    """The state numpy pickles with a plain dtype, ``(3, byteorder, None, None, None, size,
    alignment, flags)``: it may set the byte order only. Its flags must be the dtype's own
    (the has-object flags would make numbers count as pointers), no fields or subarray."""
    if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
        _refuse("it sets a numpy dtype's state to something numpy never writes for plain data")
    _, order, subarray, names, fields, size, alignment, flags = state
    plain = (-1, -1) if d.kind not in _FLEXIBLE else (d.itemsize, d.alignment)
    # Python 2 wrote the byte order as a str, which encoding="bytes" reads as bytes
    orders = ("<", ">", "|", "=", b"<", b">", b"|", b"=")
    if order not in orders or subarray is not None or names is not None or fields is not None \
            or type(flags) is not int or flags != d.flags or (size, alignment) != plain:
        _refuse(f"it changes the numpy dtype {d!r} into something other than plain data")


def _check_array_state(state) -> None:
    """``(version, shape, dtype, fortran, bytes)`` (version 1, or without it as older numpy
    wrote): the array's data as bytes, of a plain dtype."""
    if isinstance(state, tuple) and len(state) == 5:
        state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4):
        _refuse("it sets a numpy array's state to something numpy never writes")
    _plain_dtype(state[1])
    if type(state[3]) not in (bytes, bytearray):
        _refuse(f"it gives a numpy array's data as a {type(state[3]).__name__}, not bytes")


def _check_data(obj) -> None:
    """Refuse anything in the loaded structure, at any depth, that is not data: an object
    array anywhere (its elements are pointers), or any object but containers, numbers,
    strings, plain arrays and dtypes. Iterative, so a deeply nested file cannot overflow."""
    seen: set[int] = set()
    todo = [obj]
    while todo:
        x = todo.pop()
        if type(x) in _DATA_TYPES:
            continue
        if id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) is dict:
            todo.extend(x.keys())
            todo.extend(x.values())
        elif type(x) in (list, tuple, set, frozenset):
            todo.extend(x)
        elif type(x) is np.ndarray:
            _plain_dtype(x.dtype)
        elif isinstance(x, np.dtype):
            _plain_dtype(x)
        else:
            _refuse(f"it holds a {type(x).__name__}, which a data file never holds")


def load_data_pickle(path: Path, what: str, fix: str):
    """Unpickle ``path`` (``encoding="bytes"``, as the CIFAR release needs) allowing data only.

    ``what`` names the file's kind in errors ("CIFAR-10 batch"); ``fix`` says how to repair it."""
    try:
        with open(path, "rb") as f:
            obj = _DataUnpickler(f, encoding="bytes").load()
        _check_data(obj)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a plain {what} ({e}); nothing in it was run; {fix}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        raise UserError(f"{path} is not a valid {what} ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    return obj
