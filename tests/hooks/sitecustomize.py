"""Installs the tests' fault hooks (tests/fault_hooks.py) in a cold run: ``python script.py`` imports
this before the script when tests/student.py has put this folder on PYTHONPATH (only when a test asks
for a fault). Nothing in the lesson code knows about it."""

import sys
from pathlib import Path

_TESTS, _ROOT = (str(p) for p in Path(__file__).resolve().parents[1:3])
sys.path[:0] = [_TESTS, _ROOT]  # (the script's own folder is not on sys.path yet)
try:
    import fault_hooks

    fault_hooks.install()
finally:
    for _path in (_TESTS, _ROOT):  # the script sees the sys.path it would have had (what was imported stays)
        sys.path.remove(_path)
