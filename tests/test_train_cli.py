"""The CLI is generated from the config dataclasses: every flag is a field, with its default."""

import argparse
import dataclasses
import inspect

import pytest

from leukray import cli
from leukray.config import DemoConfig, SynthConfig, TrainConfig, from_args


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_flag_is_a_config_field_with_its_default(command):
    sp = _subparsers(cli._parser())[command]
    configs = [cls for cls, _ in cli.COMMANDS[command][2]]
    fields = {f.name: f for cls in configs for f in dataclasses.fields(cls)}
    # --verbose is the one CLI-wide switch (quiet logs), accepted before or after the command
    dests = {a.dest for a in sp._actions if a.dest not in ("help", "verbose")}
    assert dests == set(fields)  # no flag without a field, no field without a flag
    argv = [a.option_strings[0] if a.option_strings else "x" for a in sp._actions if a.required]
    argv = [v for a in argv for v in ((a, "x") if a.startswith("--") else (a,))]
    args = sp.parse_args(argv)
    for cls in configs:  # no flag given: each config equals its dataclass defaults
        expected = cls(**{f.name: "x" for f in dataclasses.fields(cls) if f.metadata.get("required")})
        assert dataclasses.asdict(from_args(cls, args)) == dataclasses.asdict(expected)
    # the command function takes exactly these configs
    assert len(inspect.signature(cli.RUN[command]).parameters) == len(configs)


def test_demo_reuses_train_and_synth_fields_with_its_own_defaults():
    demo = {f.name: f for f in dataclasses.fields(DemoConfig)}
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert (DemoConfig().epochs, DemoConfig().workers) == (12, 2)
    assert demo["epochs"].metadata["help"] == "maximum epochs" and train["epochs"].metadata["help"].startswith(
        "maximum epochs (default: the preset")
    assert demo["workers"].metadata["help"] == train["workers"].metadata["help"]
    assert DemoConfig().per_class == SynthConfig().per_class
    args = cli._parser().parse_args(["demo", "--epochs", "3"])
    assert from_args(DemoConfig, args).epochs == 3


def test_help_of_every_command(capsys):
    """`leukray --help` too: argparse %-formats help texts, and cv's "95 % intervals" made
    the top-level help raise TypeError."""
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: leukray") and "metrics with 95 % intervals" in out
    assert all(f"\n    {command} " in out for command in cli.COMMANDS), out
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            cli._parser().parse_args([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: leukray {command}")
    train_help = _subparsers(cli._parser())["train"].format_help()
    assert train_help.index("scaling and fault tolerance:") < train_help.index("\n  --workers") < train_help.index("\nray:")


def test_report_takes_its_run_directory_as_an_argument():
    args = cli._parser().parse_args(["report", "runs/x", "--max-misclassified", "5"])
    assert (args.run_dir, args.max_misclassified, args.samples_per_class) == ("runs/x", 5, 8)


def test_the_parser_and_the_scoring_driver_import_no_torch():
    """Every `leukray` command builds the whole parser; benchmark's flags once came from the
    module that measures, which imports torch: ~1.7 s before `score` did anything. The
    scoring driver itself needs no torch either (ONNX Runtime scores in the actors)."""
    import subprocess
    import sys

    code = ("import sys; from leukray import cli; cli._parser(); from leukray.infer import score; "
            "print([m for m in ('torch', 'scipy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "--epochs and --patience must be at least 1"),
    (["train", "--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["train", "--test-fraction", "0.9"], "leave room for --val-fraction"),
    (["train", "--lr", "-1"], "--lr must be > 0"),
    (["train", "--workers", "3", "--batch-size", "2"], "--batch-size at least --workers"),
    (["train", "--image-size", "8"], "--image-size must be at least 16"),
    (["train", "--folds", "5", "--fold", "5"], "--fold in [0, --folds)"),
    (["train", "--ema-decay", "1"], "--ema-decay in (0, 1)"),
    (["cv", "--folds", "1"], "--folds must be at least 2"),
    (["demo", "--epochs", "0"], "--epochs and --patience must be at least 1"),
    (["demo", "--per-class", "0"], "--per-class must be at least 1"),
])
def test_out_of_range_training_flags_are_one_error_before_anything_is_written(tmp_path, capsys, argv, message):
    """`demo --epochs 0` trained nothing and died on the missing checkpoint with an
    AttributeError traceback, after writing the synthetic data and starting Ray."""
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    extra = ["--output", str(tmp_path / "out")] + (["--data", str(data)] if argv[0] in ("train", "cv") else [])
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert f"leukray {argv[0]}: error:" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_synth_refuses_an_empty_set(tmp_path, capsys):
    assert cli.main(["synth", "--output", str(tmp_path / "s"), "--per-class", "0"]) == 2
    assert "--per-class must be at least 1" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_evaluate_without_a_run_directory_says_so(tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "not a run directory of `leukray train` (no split.csv)" in err and "Errno" not in err, err
