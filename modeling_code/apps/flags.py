"""One spelling of command-line flags for ``code-seg`` and the ``training/`` scripts.

Long options are declared in snake_case (``--output_dir``, as transformers' scripts spell them); ``ArgumentParser``
also accepts each in kebab-case (``--output-dir``) and any old spelling registered with ``add_alias`` (``--out``).
Help shows the declared spelling only. Subcommand parsers (``add_subparsers``) are of the same class.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that accepts ``--a_b`` and ``--a-b`` alike, plus registered old spellings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._aliases: dict[str, str] = {}

    def add_alias(self, alias: str, option: str) -> None:
        """Accept ``alias`` (an old spelling, left out of the help) for the declared ``option``."""
        if option not in self._option_string_actions:
            raise ValueError(f"{option} is not an option of {self.prog}")
        self._aliases[alias] = option

    def _declared_spelling(self, token: str) -> str:
        """``token`` (``--name`` or ``--name=value``) with its name as declared, when it is another spelling of one."""
        name, equals, value = token.partition("=")
        if name in self._option_string_actions:
            return token
        stem = name[2:]
        for candidate in (self._aliases.get(name), f"--{stem.replace('-', '_')}", f"--{stem.replace('_', '-')}"):
            if candidate in self._option_string_actions:
                return candidate + equals + value
        return token

    def accepted_option(self, spelling: str) -> argparse.Action | None:
        """The action a spelling of an option selects (None if none)."""
        return self._option_string_actions.get(self._declared_spelling(spelling).partition("=")[0])

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        tokens = list(sys.argv[1:] if args is None else args)
        declared = []
        for position, token in enumerate(tokens):
            if token == "--":  # everything after it is positional
                declared.extend(tokens[position:])
                break
            declared.append(self._declared_spelling(token) if token.startswith("--") else token)
        return super().parse_known_args(declared, namespace)


__all__ = ["ArgumentParser"]
