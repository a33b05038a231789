"""Bring your own model: ``py:MODULE:CALLABLE[,key=value...]`` and ``torchscript:FILE``.

``py:`` imports ``MODULE`` (a module name, found on ``sys.path`` or in the current
directory, or a ``.py`` file path) and calls ``CALLABLE(num_classes=..., in_channels=...,
**options)``, the two size arguments by the names its signature gives them (``n_classes``,
timm's ``in_chans``, ...: :func:`_size_arguments`); option values are read as int, float,
true/false, or else kept as text.
The spec string is recorded in the checkpoint's metadata, but never run from there: a
weights file naming ``py:`` (or ``torchscript:``) would run code the user never chose
(``py:torch.hub:load,...`` fetches and runs a repository), so ``evaluate``, ``export`` and
``audit`` ask for ``--model`` with the recorded spec instead (:func:`.checkpoint.recorded_spec`).

``torchscript:FILE`` loads a scripted or traced network (``torch.jit.load``, on the CPU)
with its weights inside: a teacher without any Python code. Gradients flow through it,
so IG, KD and the overlay work; it cannot take forward hooks, so attention transfer
refuses it (:mod:`igkd.distill.attention`). :func:`to_device` puts it on a GPU (a frozen
module's weights are constants of its code, which ``Module.to`` does not move).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..spec import Spec
from .family import Family


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _import(module: str, spec: Spec):
    try:
        if module.endswith(".py") or "/" in module:
            return _import_file(Path(module))
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # the `igkd` script's path lacks the cwd
            sys.path.append(str(Path.cwd()))
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to import is the user's module's
        raise UserError(f"cannot import module '{module}' of model spec '{spec}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); check the name and that it is "
                        "importable (on PYTHONPATH or in the current directory)") from None


def _import_file(path: Path):
    """A module from a ``.py`` file, as ``python FILE`` would import it: its folder on the path
    (a sibling ``import mynets`` works) and the module in ``sys.modules`` while it runs (a
    dataclass under ``from __future__ import annotations`` looks its module up there). Named
    by the file's stem unless another module holds that name; imported once per file."""
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    path = path.resolve()
    for mod in list(sys.modules.values()):
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == path:
            return mod
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else \
        f"_igkd_user_{abs(hash(str(path))):x}"
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.append(folder)
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None:
        raise ImportError(f"{path} is not a Python module")
    mod = importlib.util.module_from_spec(loader)
    sys.modules[name] = mod
    try:
        loader.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def code_sha256(spec: str) -> str | None:
    """sha256 of the source file a ``py:`` model spec builds from (``py:FILE.py:CALLABLE``, or
    an importable module's file), None for any other spec or a file not found. What an
    experiment keys a run by beside the spec's text, and a resume compares: an edited factory
    left the spec as it was, and its old runs were reported as the new network's (helper-68).
    Only the named file: a module it imports is not followed."""
    from ..spec import parse_spec
    try:
        parsed = parse_spec(spec or "")
    except UserError:
        return None
    module = (parsed.arg or "").rpartition(":")[0] if parsed.kind == "py" else ""
    if not module:
        return None
    path = Path(module) if module.endswith(".py") or "/" in module else None
    if path is None:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        path = Path(found.origin) if found is not None and found.origin and found.origin.endswith(".py") else None
    if path is None or not path.is_file():
        return None
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


# the names factories give their size arguments: igkd's and torchvision's first, timm's in_chans
CLASS_NAMES = ("num_classes", "n_classes", "nclasses", "num_class")
# ("channels" and "num_channels" are left out: as often a width as the input's channels)
CHANNEL_NAMES = ("in_channels", "in_chans", "in_ch", "input_channels")


def _size_arguments(params, num_classes: int, in_channels: int, who: str, given=()) -> dict:
    """The keyword arguments that tell a factory the class count and the image channels, by
    the names its signature has: ``make(num_classes=10)``, ``Net(n_classes)`` and timm-style
    ``in_chans`` are all common. A factory taking ``**kwargs`` (torchvision's builders) gets
    ``num_classes``, and ``in_channels`` only for images other than RGB: its keywords go on to a
    class that may take no channels (one taking keywords alone, ``make(**kw)``, gets both); where the spec's options (``given``) name one of these
    arguments itself (``py:timm:create_model,model_name=...,in_chans=1``: its keywords go on
    to a class that takes ``in_chans``), igkd adds no second name for it. One without a
    channels argument builds for RGB: other images are refused here, as the network's first
    convolution would refuse them later with a shape error."""
    if params is None:
        return {"num_classes": num_classes, "in_channels": in_channels}
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    # a size argument before a '/' cannot be given by name (and was reported as no argument at all)
    by_position = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY and
                   (n in CLASS_NAMES or (n in CHANNEL_NAMES and in_channels != 3))]
    if by_position:
        raise UserError(f"{who} takes {', '.join(by_position)} by position only (before its '/'), and igkd passes "
                        "the size arguments by name; remove the '/'")
    out = {}
    classes = next((n for n in CLASS_NAMES if n in named), None)
    if classes is None and var_kw:
        classes = None if set(CLASS_NAMES) & set(given) else "num_classes"  # else the options name it
    elif classes is None:
        takes = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        raise UserError(f"{who} takes no argument for the number of classes (any of {', '.join(CLASS_NAMES)}; it "
                        f"takes {', '.join(takes) or 'none'}); add num_classes=, which igkd sets from the data")
    if classes is not None:
        out[classes] = num_classes
    channels = next((n for n in CHANNEL_NAMES if n in named), None)
    if channels is not None:
        out[channels] = in_channels
    elif var_kw and (in_channels != 3 or not named) and not set(CHANNEL_NAMES) & set(given):
        # a factory of keywords alone (make(**kw)) was written for igkd's own names: both
        out["in_channels"] = in_channels
    elif in_channels != 3 and not var_kw:
        raise UserError(f"{who} takes no argument for the image channels (any of {', '.join(CHANNEL_NAMES)}), so it "
                        f"builds a network for RGB images, and these have {in_channels} channel(s); add "
                        "in_channels=, which igkd sets from the data")
    return out


def _signature(factory) -> inspect.Signature | None:
    """The signature igkd reads the factory's argument names from, None where it has none (a
    builtin). A class whose own signature passes everything on (``*args, **kwargs``: a
    ``__new__`` or a metaclass ``__call__`` that Python's ``inspect`` reads before
    ``__init__``) is read from its ``__init__``: ``Net(n_classes)`` with such a ``__new__``
    was given num_classes, a TypeError from inside its ``__init__``."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    generic = all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())
    if inspect.isclass(factory) and sig.parameters and generic and factory.__init__ is not object.__init__:
        try:
            init = list(inspect.signature(factory.__init__).parameters.values())[1:]  # less self
        except (TypeError, ValueError):
            return sig
        return sig.replace(parameters=init)
    return sig


def keyword_names(spec: Spec) -> set[str] | None:
    """The keyword arguments the factory of the ``py:`` spec takes, None where it takes any
    (``**kwargs``) or has no signature. Imports the user's module, as building it would."""
    module, _, name = (spec.arg or "").rpartition(":")
    factory = getattr(_import(module, spec), name, None) if module and name else None
    sig = _signature(factory) if callable(factory) else None
    if sig is None or any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _short_repr(value, limit: int = 60) -> str:
    """A value igkd passed, cut where long (a spec option of a long string): the line names
    the arguments, it does not reprint them."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _where(tb, own_file: str | None) -> str:
    """Where a factory's exception came from: the deepest line of the factory's own file (the
    line its author can change) and, where the exception was raised deeper (torch's Conv2d
    refusing an argument), that place too."""
    frames = traceback.extract_tb(tb)
    deepest = frames[-1]
    own = Path(own_file).resolve() if own_file else None
    mine = next((f for f in reversed(frames) if own is not None and Path(f.filename).resolve() == own), None)
    if mine is None or mine is deepest:
        return f"at {Path(deepest.filename).name} line {deepest.lineno}"
    return f"at {Path(mine.filename).name} line {mine.lineno}, raised in {Path(deepest.filename).name} line " \
        f"{deepest.lineno}"


def _build_py(spec: Spec, num_classes: int, in_channels: int) -> nn.Module:
    module, _, name = (spec.arg or "").rpartition(":")
    if not module or not name:
        raise UserError(f"model spec '{spec}' needs a module and a callable: py:MODULE:CALLABLE[,key=value...]")
    mod = _import(module, spec)
    factory = getattr(mod, name, None)
    if not callable(factory):
        raise UserError(f"module '{module}' has no callable '{name}' (model spec '{spec}'); name the function or "
                        "class that builds your network")
    options = {k: _value(v) for k, v in spec.options.items()}
    sig = _signature(factory)
    params = sig.parameters if sig is not None else None
    kwargs = {**_size_arguments(params, num_classes, in_channels, f"{module}:{name}", options), **options}
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise UserError(f"{module}:{name} cannot be called with {', '.join(kwargs)} ({e}); igkd passes the "
                            f"number of classes (as {'/'.join(CLASS_NAMES)}), the image channels where it takes "
                            f"them (as {'/'.join(CHANNEL_NAMES)}) and the spec's options as keyword arguments") \
                from None
    try:
        net = factory(**kwargs)
    except UserError:  # igkd's own one line (the factory called igkd): complete, not cut to its first line
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: one line naming where, not igkd's traceback
        # (KeyboardInterrupt and SystemExit are not Exceptions: they go on as they are)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        given = ", ".join(f"{k}={_short_repr(v)}" for k, v in kwargs.items())
        raise UserError(f"{module}:{name} raised {type(e).__name__}{': ' + first if first else ''} "
                        f"({_where(e.__traceback__, getattr(mod, '__file__', None))}) when igkd called it with "
                        f"{given}; fix it or the spec's options") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"{module}:{name} returned {type(net).__name__}, not a torch.nn.Module; make it return "
                        "the network")
    return net


def _build_torchscript(spec: Spec, num_classes: int, in_channels: int) -> nn.Module:
    if not spec.arg or spec.options:
        raise UserError(f"model spec '{spec}' must be torchscript:FILE (a file written by torch.jit.save)")
    path = Path(spec.arg)
    if not path.is_file():
        raise UserError(f"TorchScript file {path} does not exist; check the path")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any decode failure is the file's fault
        raise UserError(f"{path} is not a TorchScript file ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "write one with torch.jit.save(torch.jit.script(model), FILE) or torch.jit.trace") from None


def to_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to(device)``, TorchScript included; returns the moved model (``model`` itself
    unless it is a TorchScript module that had to be loaded again).

    A frozen TorchScript module (what ``igkd export`` writes, ``torch.jit.freeze``) keeps its
    weights as constants of its code, which ``Module.to`` leaves where ``torch.jit.load`` put
    them (the CPU, for ``torchscript:FILE``): on a GPU its first forward failed ("Expected all
    tensors to be on the same device"). Such a module, the model itself or one inside it (in
    :class:`~igkd.models.Normalized`, say), is saved and loaded again with its constants on
    ``device``; its code and weights, and so its :func:`~igkd.models.teacher_identity`, stay
    the same."""
    device = torch.device(device)
    model = model.to(device)
    if isinstance(model, torch.jit.ScriptModule):
        return _reload(model, device) if _constants_elsewhere(model, device) else model
    for parent in list(model.modules()):
        if isinstance(parent, torch.jit.ScriptModule):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.jit.ScriptModule) and _constants_elsewhere(child, device):
                setattr(parent, name, _reload(child, device))
    return model


def _constants_elsewhere(module: torch.jit.ScriptModule, device: torch.device) -> bool:
    """Whether a tensor constant of the code of ``module`` (or of a module in it) is not on ``device``."""
    for m in module.modules():
        for method in m._c._method_names():
            for value in m._c._get_method(method).code_with_constants[1].values():
                if isinstance(value, torch.Tensor) and (value.device.type != device.type or (
                        device.index is not None and value.device.index != device.index)):
                    return True
    return False


def _reload(module: torch.jit.ScriptModule, device: torch.device) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit's deprecation notices: the module is TorchScript already
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location=device)


PY = Family(_build_py, "your factory: py:MODULE:CALLABLE[,key=value...]", runs_code=True)
TORCHSCRIPT = Family(_build_torchscript, "a TorchScript file, weights inside (teacher)", own_weights=True,
                     runs_code=True)
