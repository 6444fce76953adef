"""core.files: an output appears whole or not at all; core.records reads what passes wrote."""

from __future__ import annotations

import json
import os

import pytest

from pangu_light.core import contract
from pangu_light.core.files import atomic_directory, atomic_write, write_json
from pangu_light.core.records import layer_origins, pass_records


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    with atomic_write(target, suffix=".npz") as temporary:
        assert temporary.name.endswith(".npz") and temporary.parent == tmp_path
        temporary.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_atomic_directory_replaces_a_whole_directory(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "stale").write_text("x")
    with pytest.raises(KeyError):
        with atomic_directory(target) as temporary:
            (temporary / "a").write_text("half")
            raise KeyError("interrupted")
    assert sorted(os.listdir(target)) == ["stale"] and os.listdir(tmp_path) == ["dir"]
    with atomic_directory(target) as temporary:
        (temporary / "a").write_text("whole")
    assert sorted(os.listdir(target)) == ["a"] and os.listdir(tmp_path) == ["dir"]


def test_records_read_what_was_written_and_ignore_garbage(tmp_path):
    path = write_json(tmp_path / "r.json", [{"pass": "drop-layers", "modified": True}, 3])
    metadata = {contract.PASS_STATS: path.read_text(), contract.LAYER_ORIGINS: json.dumps([0, 2, 3])}
    assert pass_records(metadata) == [{"pass": "drop-layers", "modified": True}]
    assert layer_origins(metadata) == [0, 2, 3]
    assert pass_records({contract.PASS_STATS: "{not json"}) == []
    assert layer_origins({contract.LAYER_ORIGINS: '["a"]'}) is None and layer_origins({}) is None


def test_io_names():
    assert contract.past_key(3) == "past_key_values.3.key" and contract.present_value(0) == "present.0.value"
    assert contract.is_past_input(contract.past_value(1)) and not contract.is_past_input("input_ids")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
