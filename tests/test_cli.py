"""The CLI repeats the library's defaults as literals (it must not import torch to start fast):
these tests keep each literal equal to the default it stands for. And every argument is checked
before any work: one line and exit 2 for a bad one."""
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import repo_env

from screener.cli import main
from screener.dft import gpaw as dft
from screener.dft import label
from screener.pipeline import RunOptions
from screener.results.manifest import LOCK, MANIFEST, Manifest
from screener.results.shards import shard_name, write_prediction_shard
from screener.screen import screen
from screener.training import train


def signature_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def dataclass_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("command, defaults", [
    ("train", signature_defaults(train.train)),
    ("label", {**signature_defaults(label.label), **dataclass_defaults(dft.Settings)}),
    ("run", {**dataclass_defaults(RunOptions), **signature_defaults(screen)}),
])
def test_cli_defaults_are_the_library_defaults(command, defaults):
    given = {p.name: p.default for p in main.commands[command].params
             if p.name in defaults and isinstance(p.default, (bool, int, float, str))}
    assert given, f"no option of `screen {command}` has a library default"
    assert given == {name: defaults[name] for name in given}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Two predictions and no failures, written as a run writes them (no Ray needed)."""
    from test_store import ATTRS, prediction_table

    out = tmp_path_factory.mktemp("results")
    Manifest.create(out, {})
    info = write_prediction_shard(out / shard_name("predictions", 0),
                                  prediction_table(ids=["a", "b"], elements=["O", "Fe O"],
                                                   n_atoms=[3, 7]), [], ATTRS)
    Manifest.load(out).add(shard_name("predictions", 0), info)
    return out


def bad_arguments(poscars: str, results: str, a_file: str) -> list[list[str]]:
    run = ["run", "--structures", poscars, "--quiet"]
    return [[*run, "--shard-size", "0"], [*run, "--batch-size", "0"], [*run, "--batch-size", "-5"],
            [*run, "--workers", "0"], [*run, "--workers", "-1"], [*run, "--bandgap", "1.6:1.4"],
            [*run, "--bandgap", "nan:nan"], [*run, "--bandgap", "1.4"], [*run, "-o", a_file],
            [*run, "-o", "/proc/self/results"], [*run, "-o", f"{a_file}/below"],
            ["query", results, "--limit", "-3"], ["query", results, "--elements", "Xx"],
            ["query", results, "--exclude", "O,Qq"], ["query", results, "--sort", "nonexistent"],
            ["query", results, "--sort", "-nonexistent"], ["query", results, "--bandgap", "2:1"],
            ["query", results, "--n-atoms", "nan:"], ["query", results, "--dos-at-ef", ":nan"],
            ["plot", results, "a", "-o", results], ["plot", results, "a", "-o", "/nowhere/a.png"]]


N_BAD_ARGUMENTS = 21


def test_every_bad_argument_is_one_line_and_exit_2_before_any_work(results, shared_data,
                                                                     tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = bad_arguments(str(shared_data / "poscar"), str(results), str(a_file))
    assert len(cases) == N_BAD_ARGUMENTS
    for args in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, (args, result.output)
    assert a_file.read_text() == "not a folder"


def test_open_ranges_symbol_case_and_empty_answers(results):
    runner = CliRunner()
    csv = runner.invoke(main, ["query", str(results), "--n-atoms", "5:", "--format", "csv"])
    assert csv.exit_code == 0 and csv.stdout.splitlines()[1].startswith("b,"), csv.output
    lower = runner.invoke(main, ["query", str(results), "--elements", "fe,o", "--format", "csv"])
    assert lower.stdout == csv.stdout
    none = runner.invoke(main, ["query", str(results), "--bandgap", "100:", "--format", "json"])
    assert none.exit_code == 0 and none.stdout == "[]\n" and none.stderr == "0 matches\n"
    clean = runner.invoke(main, ["failures", str(results)])
    assert clean.exit_code == 0 and clean.stdout == "" and clean.stderr == "no failures\n"
    unknown = runner.invoke(main, ["plot", str(results), "unknown-id", "-o", "x.png"])
    assert unknown.exit_code == 1
    assert unknown.output == f"Error: 'unknown-id' has no prediction in {results}\n"


def test_a_second_run_into_a_folder_being_written_is_refused(results, shared_data, tmp_path):
    from test_store import HOLD_LOCK

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=repo_env())
    try:
        assert holder.stdout.readline() == "held\n"
        result = CliRunner().invoke(main, ["run", "--structures", str(shared_data / "poscar"),
                                           "-o", str(tmp_path), "--quiet"])
        assert result.exit_code == 1
        assert result.output == (f"Error: {tmp_path}: another `screen run` is writing here (it "
                                 f"holds {tmp_path / LOCK}); wait for it to end, or use "
                                 "another -o\n")
        assert not (tmp_path / MANIFEST).exists()
        query = CliRunner().invoke(main, ["query", str(results)])
        assert query.exit_code == 0
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_progress_bars_show_a_total_and_ray_start_up_notices_stay_out(shared_data, tiny_model,
                                                                      tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in sorted(p.name for p in (shared_data / "poscar").iterdir())[:6]:
        (inputs / name).write_bytes((shared_data / "poscar" / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "screener.cli", "run", "--structures",
                           str(inputs), "--model", str(tiny_model), "-o", str(tmp_path / "r")],
                          check=False, env=repo_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for stage in ("graphs", "predict"):
        assert re.search(rf"{stage}: 100%\|.*\| 6/6 \[\d\d:\d\d<00:00", done.stderr), done.stderr
    assert "Started a local Ray" not in done.stderr and "authentication" not in done.stderr
