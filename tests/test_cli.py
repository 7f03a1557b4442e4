"""The `vitpipe` command: every subcommand is reachable and documents its options."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from vitpipe.cli import COMMANDS, build_parser, main


def test_top_level_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "vitpipe.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def _subparser(name):
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help_documents_every_option(name, capsys):
    module_name = COMMANDS[name][0]
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            pytest.fail(f"subcommand {name!r}: its module {module_name} does not exist yet")
        raise
    undocumented = [a.option_strings or a.dest for a in _subparser(name)._actions
                    if not (a.help and a.help.strip()) and a.help != argparse.SUPPRESS]
    assert not undocumented, f"vitpipe {name}: options without a help text: {undocumented}"
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"vitpipe {name}" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    assert "frobnicate" in capsys.readouterr().err


def test_unknown_option_shows_the_commands_usage_and_the_closest_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--data.shards", "x", "--data.image-sise", "32"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: vitpipe pretrain" in err
    assert "unrecognized arguments: --data.image-sise" in err and "did you mean --data.image-size?" in err
    with pytest.raises(SystemExit):
        main(["pretrain", "--data.bogus", "3"])
    assert "see 'vitpipe pretrain --help'" in capsys.readouterr().err


def test_evaluate_help_leaves_out_the_training_only_data_options(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "--data.eval-batch-size" in out and "--data.image-size" in out
    assert "[default: the model's]" in " ".join(out.split())  # size, channels, mean, std follow the model
    for hidden in ("--data.augment", "--data.batch-size", "--data.shuffle-buffer", "--data.epoch-fill"):
        assert hidden not in out, hidden
    # still accepted: one config file may serve training and evaluation
    args = build_parser("evaluate").parse_args(["evaluate", "--data.batch-size", "8", "--data.augment.hflip", "0"])
    assert vars(args)["data.batch_size"] == 8
