"""What a method part is: options, needs, an optional batch transform and a loss.

A method (``kd+ig+at``) is a set of parts. The trainer (:mod:`igkd.distill.trainer`)
builds each batch, runs the teacher when some part needs it, adds the cross-entropy
term and the terms of every part, and knows no part by name. A part declares:

* ``fields``: its config options (``igkd.options.opt``): they become fields of
  :class:`igkd.config.DistillConfig`, options ``--name`` of ``igkd distill``, lines of
  ``--help``, and enter a run's key only when the part is in its method;
* ``search``: default value lists of those options for ``igkd experiment search``
  (``log_scale``: those TPE samples on a log scale);
* its needs: the teacher, its logits (precomputed by sample index or online), the
  store's maps, maps that follow the batch's crop and flip, gradients of the input;
* ``transform``: an optional change of the batch, at stage ``overlay`` (clean images,
  before crop and flip, like the IG overlay) or ``mix`` (after them, like CutMix);
* ``loss``: named terms ``{name: (weight, value)}``; the trainer adds ``weight * value``
  and logs ``value``. ``ce_weight`` scales the cross-entropy term (KD's ``1 - alpha``);
* ``state_dict`` / ``load_state_dict``: what of its run state a part that changes it while
  training (a running scale, an EMA, a schedule of its own) keeps in ``last.pt``, so that a
  resumed run goes on as the uninterrupted one.

Part modules import torch inside their functions: ``igkd --help`` reads every part's
options and must not pay for importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """One step's data. ``idx``: sample indices into the training split (maps and logits
    are looked up by them); ``x``: N x C x H x W float images; ``y``: labels. A mixing
    transform sets ``target`` (N x classes soft labels, used instead of ``y`` by the
    cross-entropy) and may set ``mixed`` (the images no longer are the samples ``idx``,
    so precomputed logits do not describe them). ``maps``: the teacher's maps of the
    samples, N x H x W, cropped, flipped and mixed with their images (only when a part
    asks for them)."""

    idx: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    mixed: bool = False

    def __iter__(self):  # idx, x, y = batch
        return iter((self.idx, self.x, self.y))


@dataclass
class Step:
    """What a part's loss sees: the config, the epoch (1-based), the batch, the student's
    logits on ``batch.x`` and the teacher's logits for the batch (None unless a part of
    the method needs them)."""

    cfg: Any
    epoch: int
    batch: Batch
    logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None


class Part:
    """Base class of a method part; see the module docstring. Subclasses set the class
    attributes and override what they use."""

    name: str = ""
    help: str = ""          # one line for --help and `igkd methods`
    formula: str = ""       # the README's method table
    reference: str = ""     # the paper its defaults come from
    group: str = ""         # at most one part of a group per method ("" = the part's own name)
    order: int = 100        # position in a canonical method name (kd+ig+at, not at+kd+ig)
    fields: dict = {}       # option name -> opt(...)
    search: dict = {}       # option name -> default search values
    log_scale: tuple = ()   # options TPE samples on a log scale (temperatures, weights spanning decades)
    needs_teacher: bool = False
    needs_logits: bool = False    # teacher logits of the batch's images
    needs_maps: bool = False      # the store's maps, indexed by sample
    aligned_maps: bool = False    # batch.maps: maps that follow crop, flip and mixing
    input_grad: bool = False      # batch.x requires grad (input-gradient explanations)
    double_backward: bool = False  # its loss holds gradients of the student (create_graph=True)
    online_teacher: bool = False  # its transform changes what the images are: teacher logits online
    stage: str = ""               # "overlay" or "mix": when transform runs ("" = no transform)
    # a part from outside igkd: runs and experiments know its code by the sha256 of its module's
    # source, so an edited loss trains anew; a version set here is its identity instead (only a
    # new version then makes new runs: for edits that change no result)
    version: str | None = None

    # ------------------------------------------------------------------ hooks
    def check(self, cfg, teacher, student, input_shape: tuple[int, int, int]) -> None:
        """Fail early (one-line UserError) on options that cannot work with these models."""

    def setup(self, run) -> Any:
        """Called once by the trainer; ``run`` is the :class:`~igkd.distill.trainer.Trainer`
        (``run.cfg``, ``run.teacher``, ``run.model``, ``run.maps``, ``run.hook_teacher``,
        ``run.hook_student``, ``run.meta``). Returns this part's state for the run."""
        return None

    def transform(self, state, batch: Batch, gen: torch.Generator, shard) -> Batch:
        """Change the batch (stage ``overlay`` or ``mix``). Random numbers come from ``gen``,
        drawn for the global batch and sliced with ``shard`` (see ``augment.draw``), so N
        processes see the batches one process would."""
        return batch

    def ce_weight(self, cfg) -> float:
        return 1.0

    def loss(self, state, step: Step) -> dict[str, tuple[float, torch.Tensor]]:
        """``{name: (weight, value)}``: ``weight`` a number, ``value`` a 0-d floating tensor
        computed from the student (``step.logits``, a hooked layer), so that it has a gradient;
        the same names at every step, none of them a name of the run's records (``loss``,
        ``ce``, ``epoch``, ``step``, ``lr``, ``seconds``, ``images_per_s``, ``val_*``) or
        another part's term. The trainer checks the first step's terms (one-line error)."""
        return {}

    def describe(self, state) -> str:
        """Extra words for the run's first log line (e.g. the layers attention transfer chose)."""
        return ""

    def state_dict(self, state) -> dict:
        """What of ``state`` (what :meth:`setup` returned, as training changed it) the run's
        checkpoint keeps: tensors (on any device) and plain values, loadable with
        ``torch.load(weights_only=True)``. ``{}`` for a part whose state :meth:`setup` rebuilds
        (hooks, chosen layers): most parts. Under torchrun, rank 0's is saved and every rank
        loads it."""
        return {}

    def load_state_dict(self, state, saved: dict) -> None:
        """Put back into ``state`` (a fresh :meth:`setup`'s) what :meth:`state_dict` returned
        when the checkpoint was written; ``saved`` is ``{}`` for a checkpoint without it (one
        written before the part kept any). Its tensors come back on the CPU (last.pt is read
        there): a part moves those it computes with to the run's device itself."""

    def close(self, state) -> None:
        """Release what setup took (hooks) when training ends."""

    # ------------------------------------------------------------------ facts
    @property
    def group_name(self) -> str:
        return self.group or self.name

    def __repr__(self) -> str:
        return f"<part {self.name}>"


@dataclass(frozen=True)
class Method:
    """A canonical ``+``-joined set of parts (``student``: none, cross-entropy alone)."""

    name: str
    parts: tuple = field(default=())

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def has(self, name: str) -> bool:
        return name in self.part_names

    def _any(self, attr: str) -> bool:
        return any(getattr(p, attr) for p in self.parts)

    @property
    def needs_teacher(self) -> bool:
        return self._any("needs_teacher")

    @property
    def needs_logits(self) -> bool:
        return self._any("needs_logits")

    @property
    def needs_maps(self) -> bool:
        return self._any("needs_maps") or self._any("aligned_maps")

    @property
    def online_teacher(self) -> bool:
        """Some part changes what the images are (mixing), so precomputed logits of the clean
        samples do not describe them: the teacher runs on each batch."""
        return self._any("online_teacher")

    @property
    def fields(self) -> set[str]:
        return {name for p in self.parts for name in p.fields}


__all__ = ["Batch", "Method", "Part", "Step"]
