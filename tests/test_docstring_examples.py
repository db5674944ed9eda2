"""The runnable examples in the public API's docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["maelab", "maelab.models.registry"]  # maelab.eval.embed's example: tests/eval/test_embed.py


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the examples' mkdtemp lands in tmp_path
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
