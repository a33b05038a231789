"""The deployment section of a run's report: the latency.json, export.json and
audit.json that ``bench latency``, ``export`` and ``audit`` wrote, as Markdown."""

from __future__ import annotations

import json
from pathlib import Path


def deployment_section(run_dir: str | Path) -> str:
    """Markdown of the latency.json, export.json and audit.json found in ``run_dir``
    (empty string when there are none)."""
    from .audit import audit_table
    from .export import export_summary
    from .latency import latency_table
    run_dir = Path(run_dir)
    parts = []

    def load(name: str) -> dict | None:
        path = run_dir / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    if (lat := load("latency.json")) is not None:
        parts.append("### Latency\n\n" + latency_table(lat))
    if (exp := load("export.json")) is not None:
        parts.append("### Export\n\n" + export_summary(exp).replace("\n", "\n\n"))
    if (aud := load("audit.json")) is not None:
        text = "### Attribution agreement with the teacher\n\n" + audit_table(aud)
        if aud.get("gallery") and (run_dir / aud["gallery"]).is_file():
            text += f"\n\n![teacher and student IG maps]({aud['gallery']})"
            if aud.get("gallery_names"):
                text += f"\n\n{aud['gallery_names']}"
        parts.append(text)
    return ("## Deployment\n\n" + "\n\n".join(parts) + "\n") if parts else ""
