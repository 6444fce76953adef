"""Sessions on graphs whose weights are in an external file: they run, and a missing or
truncated weights file is one clear line naming it (before ONNX Runtime's long message)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pangu_light.passes.infra.graph_io import data_files, load_model, save_model_atomic
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.session import create_session


@pytest.fixture
def external_graph(exported_graph, tmp_path):
    _, path = exported_graph("llama")
    return path, save_model_atomic(load_model(path), tmp_path / "model.onnx", external=True)


def test_external_graph_runs_like_the_embedded_one(external_graph):
    embedded, external = external_graph
    feeds = {"input_ids": np.array([[5, 6, 7]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    outputs = [create_session(p, provider="cpu").session.run(["logits"], feeds)[0] for p in (embedded, external)]
    np.testing.assert_array_equal(*outputs)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_weights_file_is_named(external_graph, damage):
    _, external = external_graph
    (data,) = data_files(external)
    if damage == "missing":
        data.unlink()
    else:
        os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(RuntimeUserError) as error:
        create_session(external, provider="cpu")
    assert damage in str(error.value) and str(data) in str(error.value) and "\n" not in str(error.value)
