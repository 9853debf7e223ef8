"""Fixtures shared by the test modules; plain helper functions are in helpers.py.

Markers (registered in pyproject.toml; `python -m pytest` runs everything):
    slow          trains or runs a subprocess for several seconds or more
    multiprocess  starts several training processes (torch.distributed over gloo)
Deselect them for a quick pass: `python -m pytest -m "not slow and not multiprocess"`.
"""

from __future__ import annotations

import pytest

from helpers import write_corpus


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """SAMOE_CACHE under tmp_path: no test reads or fills the user's cache."""
    monkeypatch.setenv("SAMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path, isolated_cache):
    """helpers.write_corpus in tmp_path, with an isolated cache."""
    return write_corpus(tmp_path / "corpus.txt")
