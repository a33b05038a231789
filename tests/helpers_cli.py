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
