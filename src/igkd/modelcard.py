"""A short model card (``README.md``) for each training run: what was trained, on which
data, with which method and teacher, how accurate it is, and how to load it.

Written by the trainer next to ``model.safetensors`` from the run's summary, so a run
folder copied elsewhere explains itself.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .distill.parts import PLAIN, parse_method
from .progress import fmt_percent


def _anywhere(text: str) -> str:
    """``text`` (a data or model spec) with a relative path in it made absolute: the card's
    commands run in the run folder, where ``imagefolder:data/pets`` or ``py:nets.py:make``
    named another folder's files. Resolved while the run that read them is still in its own
    working directory."""
    from .spec import Spec, parse_spec
    try:
        spec = parse_spec(str(text))
    except Exception:  # noqa: BLE001 - a spec igkd cannot parse stays as it was recorded
        return text
    if not spec.arg:
        return text
    # py:FILE.py:CALLABLE holds its file before the last ':'; a data spec's argument is the path
    head, sep, tail = spec.arg.rpartition(":") if spec.kind == "py" else ("", "", spec.arg)
    path = Path(head if sep else tail)
    if path.is_absolute() or not path.exists():
        return text
    arg = f"{path.resolve()}{sep}{tail}" if sep else str(path.resolve())
    return str(Spec(spec.kind, arg, spec.options))


def _memory_evaluation(dataset: str, model: str) -> list[str]:
    """Python lines scoring the model on data given in memory: the same tensors again
    (``model``: the spec ``evaluate`` must be given, where the file alone does not rebuild it)."""
    model = f", model={model!r}" if model else ""
    return ["", f"# trained on data given to the Python API in memory ({dataset}): no spec or command loads it;",
            "# build it again from the same tensors (its .spec is then the one above) and score the model on it",
            'data = igkd.from_tensors(train=(x_train, y_train), test=(x_test, y_test), classes=meta["classes"])',
            f'print(igkd.evaluate("model.safetensors", data=data{model})["accuracy"])']


def model_card(summary: dict, meta: dict) -> str:
    """Markdown text of the card; ``meta`` is the checkpoint's metadata (classes, preprocessing...)."""
    method = summary.get("method", "student")
    parsed = parse_method(method)
    parts = parsed.parts
    teacher = summary.get("teacher") or {}
    test = summary.get("test") or {}
    classes = meta.get("classes") or []
    pre = meta.get("preprocessing") or {}
    how = "cross-entropy" if method == PLAIN.name else f"`{method}`"
    lines = [f"# {summary['model']} trained with {how} on `{summary['dataset']}`", ""]
    what = f"- **Model:** `{summary['model']}`, {summary['params']:,} parameters"
    if summary.get("compression"):
        what += f", {summary['compression']:.2f}x fewer than its teacher"
    lines.append(what)
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    lines.append(f"- **Data:** `{summary['dataset']}`: {summary.get('train_images', '?')} training and "
                 f"{summary.get('val_images', '?')} validation images, {len(classes)} classes ({shown}), "
                 f"{meta.get('in_channels', '?')} x {' x '.join(map(str, meta.get('image_size', [])))} inputs")
    norm = ("raw pixels in [0, 1]" if pre.get("normalize", "none") == "none" else
            f"pixels in [0, 1], normalised inside the model with mean {pre.get('mean')} and std {pre.get('std')}")
    lines.append(f"- **Input:** float32 NCHW {norm}")
    if parts:
        lines.append(f"- **Method:** `{method}` = cross-entropy" + "".join(f" + {p.name} ({p.help})" for p in parts))
        # the trainer records the options of the method's parts in the summary
        options = {k: summary[k] for k in sorted(parsed.fields) if k in summary}
        if options:
            lines.append("- **Method options:** " + ", ".join(f"{k} = {v}" for k, v in sorted(options.items())))
        if summary.get("logits"):
            lines.append(f"- **Teacher logits:** {summary['logits']}")
        if summary.get("maps"):
            lines.append(f"- **Teacher maps:** {summary['maps']['description']}")
        elif summary.get("ig"):  # a summary written before the maps were described by their attribution
            ig = summary["ig"]
            lines.append(f"- **Teacher maps:** {ig.get('attribution', 'ig')}, {ig.get('steps')} steps "
                         f"{ig.get('method')}, baseline {ig.get('baseline')}")
    else:
        lines.append("- **Method:** cross-entropy alone")
    init = summary.get("init") or {}
    if init.get("from") == "teacher":
        lines.append(f"- **Initialised from:** the teacher's matching tensors ({init.get('copied')} of {init.get('of')})")
    elif init.get("from"):
        lines.append(f"- **Initialised from:** `{init['from']}` (sha256 `{init.get('sha256', '?')[:16]}...`), "
                     f"{init.get('copied')} of {init.get('of')} tensors copied")
    if teacher:
        # a teacher handed to the API as a module has no file: the card said "from `None`"
        source = f"from `{teacher['path']}`" if teacher.get("path") else "handed to the API as a module"
        # a frozen TorchScript teacher has its weights as constants: it counts 0 parameters, not "0 parameters"
        params = f"{teacher['params']:,} parameters" if teacher.get("params") else "parameters not countable"
        lines.append(f"- **Teacher:** `{teacher.get('model')}` {source}, {params}, "
                     f"weights fingerprint `{teacher.get('fingerprint', '?')}`")
    kappa = f"{test['kappa']:.3f}" if isinstance(test.get("kappa"), float) else "n/a"
    # with --val-fraction 0 there is no validation split: every epoch counts as the best, so
    # the file holds the last epoch, and no validation accuracy chose it
    validated = summary.get("val_images") != 0
    # a py:/torchscript: model runs only when named (models.recorded_spec): the commands name it
    from .models import find_family
    family = find_family(summary["model"])  # none for module:CLASS, a module handed to the API
    own_code = family is not None and family.runs_code
    # module:CLASS: no spec rebuilds it, and the file alone is refused; the user names a factory
    api_module = family is None and str(summary["model"]).startswith("module:")
    model_spec = _anywhere(summary["model"]) if own_code else "py:FILE.py:CALLABLE" if api_module else ""
    model_flag = f" --model {shlex.quote(model_spec)}" if model_spec else ""
    # data given to the Python API in memory (memory:sha256=HEX): no spec loads it, and the
    # command line igkd evaluate --data memory:... is refused; the card says how to score it instead
    from .data.memory import is_memory_spec
    in_memory = is_memory_spec(summary["dataset"])
    if validated:
        val_row = (f"| validation (best epoch, {summary.get('best_epoch')} of {summary.get('epochs')}) | "
                   f"{fmt_percent(summary.get('val_accuracy'))} | | | {summary.get('val_images', '?')} |")
        kept = "`model.safetensors` holds the best epoch by validation accuracy."
    else:
        val_row = "| validation | none (--val-fraction 0) | | | 0 |"
        kept = "`model.safetensors` holds the last epoch (no validation split chose one: --val-fraction 0)."
    lines += ["", "## Accuracy", "",
              "| split | accuracy | balanced accuracy | Cohen's kappa | images |", "|---|---:|---:|---:|---:|",
              f"| test | {fmt_percent(summary.get('test_accuracy'))} | {fmt_percent(test.get('balanced_accuracy'))} | {kappa} | "
              f"{test.get('total', '?')} |",
              val_row, "",
              f"Trained for {summary.get('epochs')} epochs ({summary.get('train_seconds', 0):.0f} s, "
              f"{summary.get('processes', 1)} process(es), global batch {summary.get('global_batch')}, lr "
              f"{summary.get('lr', 0):g}); {kept}", "",
              "## Use it", "", "```python", "import igkd", "",
              (f'model, meta = igkd.load_model("model.safetensors", {_anywhere(summary["model"])!r})  # your code: named, '
               'never read from the file' if own_code else
               f'model, meta = igkd.load_model("model.safetensors", "py:FILE.py:CALLABLE")  # {summary["model"]} '
               'was handed to the API: name a factory that builds it (py:FILE.py:CALLABLE)' if api_module else
               'model, meta = igkd.load_model("model.safetensors")  # architecture, classes, preprocessing from '
               'the file'),
              "logits = model(images)  # float32 N x C x H x W in [0, 1]", 'print(meta["classes"])',
              *(_memory_evaluation(summary["dataset"], model_spec) if in_memory else []), "```", "",
              "```bash",
              *([] if in_memory else [
                  # quoted: a spec holds shell characters (imagefolder:"/my data",size=32)
                  f"igkd evaluate --weights model.safetensors{model_flag} --data "
                  f"{shlex.quote(_anywhere(summary['dataset']))}"]),
              *(["# the export checks its parity on test images: the same data, on disk (a spec)"] if in_memory else []),
              f"igkd export --weights model.safetensors{model_flag}{' --data SPEC' if in_memory else ''} "
              "--format onnx --output model.onnx",
              # files decoded as the training images were: what model(images) above needs made by hand
              f"igkd predict --weights model.safetensors{model_flag} IMAGE_FILES_OR_FOLDERS",
              "```", "",
              "Files: `model.safetensors` (weights; its header also holds the metadata), `model.json` (metadata), "
              "`config.yaml` (the resolved options), `metrics.jsonl` (one line per epoch), `summary.json`, "
              "`last.pt` (the state `--resume` continues from).", ""]
    return "\n".join(lines)


__all__ = ["model_card"]
