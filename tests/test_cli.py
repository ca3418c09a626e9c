"""The CLI repeats the library's defaults as literals (it must not import torch to start fast):
these tests keep each literal equal to the default it stands for."""
import dataclasses
import inspect

import pytest

from screener import dft, label, pipeline, train
from screener.cli import main


def signature_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def dataclass_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("command, defaults", [
    ("train", signature_defaults(train.train)),
    ("label", {**signature_defaults(label.label), **dataclass_defaults(dft.Settings)}),
    ("run", dataclass_defaults(pipeline.RunOptions)),
])
def test_cli_defaults_are_the_library_defaults(command, defaults):
    given = {p.name: p.default for p in main.commands[command].params
             if p.name in defaults and isinstance(p.default, (bool, int, float, str))}
    assert given, f"no option of `screen {command}` has a library default"
    assert given == {name: defaults[name] for name in given}
