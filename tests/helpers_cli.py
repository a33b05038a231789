"""``igkd ARGS`` for tests: in this process by default (igkd.cli.main, the command's own
code without the 2-4 s of interpreter and torch start-up per call), or as a real process
where the test is about processes (locks, kills, what the installed command does)."""

import contextlib
import io
import os
import subprocess
import sys


def run_igkd(*args, cwd=None, process=False, module="igkd") -> subprocess.CompletedProcess:
    if process or cwd is not None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=300)
    from igkd.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def installed_plugin(root, module: str, code: str, entry_points: str) -> dict:
    """A package installed as pip would leave it (``module``.py and its ``.dist-info`` with
    ``entry_points``) in ``root``/plugin; returns the environment whose PYTHONPATH finds it."""
    from pathlib import Path
    plugin = Path(root) / "plugin"
    info = plugin / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (plugin / f"{module}.py").write_text(code)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": str(plugin)}
