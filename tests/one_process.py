"""Run pytest in several project folders one after another, in one interpreter.

    python one_process.py '{"FOLDER": ["ARG", ...], ...}'    (from the folders' parent)

What the loop-configuration scenarios need from a process of their own (a loop, a
connection or a task left behind shows when the interpreter collects it, often at its exit)
this gives them at the cost of one interpreter start instead of one per configuration. Each
folder's output goes to ``FOLDER.out`` and its exit code to ``FOLDER.code``; the project's own
modules (``models``, ``test_app``, ``conftest``, ...) are forgotten between runs, everything
else stays loaded, as in a long-lived process. What the interpreter itself prints at the end
(after a last garbage collection) goes to this process's output, for the caller to check.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest

BASE = ("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist")


def _forget_modules_under(root: Path) -> None:
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(root):
            del sys.modules[name]


def _run(folder: Path, args: list[str]) -> int:
    path = list(sys.path)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(folder.with_suffix(".out"), "wb") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        os.chdir(folder)
        try:
            return int(pytest.main([*BASE, *args]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.chdir(folder.parent)
            sys.path[:] = path
            _forget_modules_under(folder)


def main() -> None:
    parent = Path.cwd().resolve()
    for name, args in json.loads(sys.argv[1]).items():
        folder = parent / name
        folder.with_suffix(".code").write_text(str(_run(folder, args)))
    gc.collect()


if __name__ == "__main__":
    main()
