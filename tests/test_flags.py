"""One spelling of flags everywhere: snake_case long options (``--output_dir``) in every ``code-seg`` subcommand and
every ``training/`` script, each also accepted in the kebab-case spelling; the old spellings still work."""

from __future__ import annotations

import argparse
import re
import runpy
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from modeling_code.apps.cli import build_parser

TRAINING_SCRIPTS = sorted((REPO_ROOT / "training").glob("*.py"))
# Old spellings that keep working: (command, flag as before, its value, the attribute it sets).
OLD_SPELLINGS = [
    (["segment", "x.png", "--classes", "cat", "--model", "m"], "--out", "o", "out"),
    (["segment", "x.png", "--classes", "cat", "--model", "m", "--out", "o"], "--bg-thresh", "0.3", "bg_thresh"),
    (["segment", "x.png", "--classes", "cat", "--model", "m", "--out", "o"], "--max-pixels", "9", "max_pixels"),
    (["toy-world"], "--output-dir", "o", "output_dir"),
    (["evaluate", "--model", "m"], "--data-root", "d", "data_root"),
]


class Captured(Exception):
    """Raised instead of parsing, carrying the parser a script built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def script_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    def capture(parser, *args, **kwargs):
        raise Captured(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    main = runpy.run_path(str(path), run_name="flags_under_test")["main"]
    with pytest.raises(Captured) as caught:
        main([])
    return caught.value.parser


def parsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and those of its subcommands."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.extend(parsers_of(sub))
    return found


def declared_long_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def check_one_spelling(parser: argparse.ArgumentParser, where: str) -> None:
    assert any(declared_long_options(sub) for sub in parsers_of(parser)), where
    for sub in parsers_of(parser):
        options = declared_long_options(sub)
        kebab = [option for option in options if "-" in option[2:]]
        assert not kebab, f"{where} {sub.prog}: declare snake_case options, not {kebab}"
        for option in options:
            if "_" in option:
                other = "--" + option[2:].replace("_", "-")
                action = next(action for action in sub._actions if option in action.option_strings)
                assert sub.accepted_option(other) is action, f"{where}: {other} is not accepted for {option}"


def test_every_code_seg_subcommand_declares_snake_case_and_accepts_both():
    check_one_spelling(build_parser(), "code-seg")


@pytest.mark.parametrize("path", TRAINING_SCRIPTS, ids=lambda path: path.name)
def test_every_training_script_declares_snake_case_and_accepts_both(path, monkeypatch):
    check_one_spelling(script_parser(path, monkeypatch), str(path.relative_to(REPO_ROOT)))


@pytest.mark.parametrize(("command", "flag", "value", "attribute"), OLD_SPELLINGS,
                         ids=[flag for _, flag, _, _ in OLD_SPELLINGS])
def test_old_spellings_keep_working(command, flag, value, attribute):
    args = build_parser().parse_args([*command, flag, value])
    assert str(getattr(args, attribute)) == value


def test_both_spellings_of_a_flag_with_a_value_after_an_equals_sign():
    parser = build_parser()
    for spelling in ("--output_dir=o", "--output-dir=o", "--out=o"):
        assert str(parser.parse_args(["segment", "x.png", "--classes", "c", "--model", "m", spelling]).out) == "o"


def test_help_shows_the_declared_spelling_only(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "--help"])
    shown = capsys.readouterr().out
    assert "--output_dir" in shown and "--bg_thresh" in shown and "--no_pamr" in shown
    assert not re.search(r"--(output-dir|bg-thresh|no-pamr|max-pixels)\b", shown)
