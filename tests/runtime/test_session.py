"""create_session: provider choice and fall-back reporting, option checks, optimisation level,
threads, and one-line errors for bad inputs."""

from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest

from pangu_light.runtime import session as session_module
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.session import (
    CANN_OPTION_KEYS,
    ProviderFallbackWarning,
    create_session,
    resolve_provider,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_CANN = "CANNExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def llama_kv(exported_graph):
    return exported_graph("llama", True)[1]


def test_unknown_provider_lists_valid_ones(llama_kv):
    with pytest.raises(RuntimeUserError) as error:
        create_session(llama_kv, provider="tpu")
    message = str(error.value)
    assert "'tpu'" in message
    for name in ("auto", "cann", "cuda", "cpu"):
        assert name in message
    assert "\n" not in message


def test_cpu_session(llama_kv):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)
        info = create_session(llama_kv, provider="cpu")
    assert info.providers_in_use == ["CPUExecutionProvider"]
    assert not info.fell_back and info.warnings == []
    assert info.device_type == "cpu"
    assert info.describe().startswith("providers: CPUExecutionProvider (requested cpu)")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: no fall-back to observe")
def test_cuda_request_falls_back_visibly(llama_kv):
    with pytest.warns(ProviderFallbackWarning, match="requested provider cuda"):
        info = create_session(llama_kv, provider="cuda")
    assert info.fell_back is True
    assert info.providers_in_use == ["CPUExecutionProvider"]
    assert "FELL BACK" in info.describe()
    assert len(info.warnings) == 1 and "CUDAExecutionProvider" in info.warnings[0]


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: no fall-back to observe")
def test_strict_turns_fall_back_into_error(llama_kv):
    with pytest.raises(RuntimeUserError, match="--strict-provider"):
        create_session(llama_kv, provider="cuda", strict=True)


@pytest.mark.skipif(HAS_CANN, reason="the CANN provider is listed here")
def test_cann_request_without_cann_falls_back(llama_kv):
    with pytest.warns(ProviderFallbackWarning):
        info = create_session(llama_kv, provider="cann", provider_options={"device_id": 0, "enable_cann_graph": True})
    assert info.fell_back and info.providers_in_use == ["CPUExecutionProvider"]
    assert info.provider_options == {"device_id": "0", "enable_cann_graph": "1"}


def test_unknown_cann_option_names_valid_ones(llama_kv):
    with pytest.raises(RuntimeUserError) as error:
        create_session(llama_kv, provider="cann", provider_options={"device_id": 0, "npu_memory": "1G"})
    message = str(error.value)
    assert "npu_memory" in message and "device_id" not in message.split(":")[0]
    for key in CANN_OPTION_KEYS:
        assert key in message


def test_cpu_provider_refuses_options(llama_kv):
    with pytest.raises(RuntimeUserError, match="takes none"):
        create_session(llama_kv, provider="cpu", provider_options={"device_id": 0})


def test_auto_needs_cann_libraries_not_just_the_listing(monkeypatch):
    listed = ["CANNExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(session_module.ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(session_module, "cann_libraries_present", lambda: False)
    assert resolve_provider("auto") == "cpu"
    monkeypatch.setattr(session_module, "cann_libraries_present", lambda: True)
    assert resolve_provider("auto") == "cann"
    listed.insert(1, "CUDAExecutionProvider")
    monkeypatch.setattr(session_module, "cann_libraries_present", lambda: False)
    assert resolve_provider("auto") == "cuda"


def test_auto_on_this_machine(llama_kv):
    info = create_session(llama_kv)  # auto
    expected = "cuda" if HAS_CUDA else "cpu"
    if HAS_CANN and session_module.cann_libraries_present():
        expected = "cann"
    assert info.chosen_provider == expected
    assert info.requested_provider == "auto"


def test_auto_drops_options_when_it_picks_cpu(llama_kv, monkeypatch):
    monkeypatch.setattr(session_module, "resolve_provider", lambda provider: "cpu")
    with pytest.warns(ProviderFallbackWarning, match="ignored"):
        info = create_session(llama_kv, provider="auto", provider_options={"device_id": 1})
    assert info.provider_options == {}


def _node_count(path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def test_optimization_level_is_applied(llama_kv, tmp_path):
    original = _node_count(llama_kv)
    counts = {}
    for level in ("disabled", "basic", "all"):
        out = tmp_path / f"{level}.onnx"
        info = create_session(llama_kv, provider="cpu", optimization_level=level, optimized_model_path=out)
        assert info.session.get_session_options().graph_optimization_level == session_module.OPTIMIZATION_LEVELS[level]
        counts[level] = _node_count(out)
    assert counts["disabled"] == original
    assert counts["basic"] < original  # constant folding of the weight Transposes at least
    assert counts["all"] <= counts["basic"]


def test_unknown_optimization_level(llama_kv):
    with pytest.raises(RuntimeUserError, match="extended"):
        create_session(llama_kv, optimization_level="max")


def test_threads_are_applied(llama_kv):
    info = create_session(llama_kv, provider="cpu", threads=1)
    assert info.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(RuntimeUserError, match="at least 1"):
        create_session(llama_kv, provider="cpu", threads=0)


def test_spinning_can_be_turned_off(llama_kv):
    info = create_session(llama_kv, provider="cpu", threads=2, spinning=False)
    entries = info.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert entries == "0" and info.spinning is False and "(no spinning)" in info.describe()
    default = create_session(llama_kv, provider="cpu")
    assert default.spinning is True and "spinning" not in default.describe()


def test_missing_model_file(tmp_path):
    with pytest.raises(RuntimeUserError, match="does not exist"):
        create_session(tmp_path / "nope.onnx", provider="cpu")


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07not a protobuf" * 8)
    with pytest.raises(RuntimeUserError) as error:
        create_session(path, provider="cpu")
    assert "could not load" in str(error.value) and "\n" not in str(error.value)


def test_runtime_imports_nothing_outside_its_rule():
    """runtime/ ships alone: importing it loads no torch/transformers/onnx and nothing of ours but the
    foundation (pangu_light.core)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import pangu_light.runtime.session, pangu_light.runtime.generate, pangu_light.runtime.tokenizer\n"
        "import pangu_light.runtime.benchmark, pangu_light.runtime.machine\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnx_ir', "
        "'onnxscript', 'tokenizers') or (m.startswith('pangu_light.') and "
        "not m.startswith(('pangu_light.runtime', 'pangu_light.core'))))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
