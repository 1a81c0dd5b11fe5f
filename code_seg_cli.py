"""Entry point of the ``code-seg`` console script: answers ``--help`` and argument errors before torch is imported.

``import modeling_code`` registers the package with transformers' Auto classes, which imports transformers'
configuration machinery and torch (seconds). Parsing arguments needs neither, so ``main`` imports the command line
with ``deferring_registration`` set, which the package reads to skip that step; the commands that load a model
register on their way (``modeling_code.register_auto_classes``). A top-level module, because the package's
``__init__`` runs before any of its submodules.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

deferring_registration = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``code-seg`` with ``argv`` (default: the process arguments); returns the exit code."""
    global deferring_registration
    deferring_registration = True
    try:
        from modeling_code.apps.cli import main as run
    finally:
        deferring_registration = False
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
