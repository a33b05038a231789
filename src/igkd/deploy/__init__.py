"""Deployment commands: ``igkd bench latency``, ``igkd export``, ``igkd audit``, ``igkd predict``.

One module per command, each a function that validates its input first, writes
atomically and returns a dict (the command's ``--json`` output), and a function that
renders that dict as text:

    latency.py   bench_latency, latency_table
    export.py    export_model, export_summary   (the exporters themselves: igkd/export.py)
    audit.py     audit, audit_table
    classify.py  predict, predict_table: image files classified as the model's data was decoded
    plots.py     the audit gallery
    report.py    deployment_section: the JSON files these commands write, as Markdown
    common.py    comma lists, shapes, checks shared by the commands

Their options are the dataclasses of :mod:`igkd.command_options`. Names are imported
on first use (as in ``igkd/__init__.py``), so ``igkd.deploy.audit`` is the function
however the submodule ``audit`` was imported.
"""

from .._lazy import lazy_package

_NAMES = {
    "bench_latency": ".latency", "latency_table": ".latency",
    "export_model": ".export", "export_summary": ".export", "FORMATS": ".export",
    "audit": ".audit", "audit_table": ".audit", "TARGETS": ".audit",
    "predict": ".classify", "predict_table": ".classify",
    "deployment_section": ".report",
    "parse_ints": ".common", "parse_shape": ".common", "split_list": ".common", "split_specs": ".common",
}
lazy_package(__name__, _NAMES)
__all__ = sorted(_NAMES)
