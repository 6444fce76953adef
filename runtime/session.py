"""ONNX Runtime sessions on CANN (Ascend), CUDA or CPU, with fall-backs made visible.

ONNX Runtime falls back to the CPU quietly: the ``onnxruntime-cann`` wheel lists
``CANNExecutionProvider`` even on a machine without Ascend, and a session created with it
then runs on the CPU with one log line and no exception. So after creating a session we
compare ``session.get_providers()`` with what was requested and, when they differ, set
``SessionInfo.fell_back`` and issue a ``ProviderFallbackWarning`` (or raise, with
``strict=True``).

Provider choice:

    auto  CANN if the provider is listed AND the CANN runtime library (libascendcl) is found,
          else CUDA if listed, else CPU
    cann / cuda / cpu  that provider, CPU as the fall-back

Requesting a provider this onnxruntime build does not list (``cuda`` with the plain CPU
wheel) is not an error: the session runs on the CPU with ``fell_back=True`` and a warning,
the same outcome as CANN's own silent fall-back, so both are reported one way. Pass
``strict=True`` (CLI: ``--strict-provider``) to make any fall-back a ``RuntimeUserError``.
"""

from __future__ import annotations

import ctypes.util
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from pangu_light.runtime.errors import RuntimeUserError

__all__ = [
    "CANN_OPTION_KEYS",
    "OPTIMIZATION_LEVELS",
    "PROVIDERS",
    "ProviderFallbackWarning",
    "SessionInfo",
    "cann_libraries_present",
    "create_session",
    "resolve_provider",
]

# Short names users type -> ONNX Runtime execution provider names.
PROVIDERS: dict[str, str] = {
    "cann": "CANNExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_SHORT = {long: short for short, long in PROVIDERS.items()}
PROVIDER_CHOICES = ("auto", *PROVIDERS)

# The CANN execution provider's documented options (onnxruntime-cann 1.24).
CANN_OPTION_KEYS = (
    "device_id",
    "npu_mem_limit",
    "arena_extend_strategy",
    "enable_cann_graph",
    "dump_graphs",
    "dump_om_model",
    "precision_mode",
    "op_select_impl_mode",
    "optypelist_for_implmode",
)

OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}

# Where the CANN toolkit installs libascendcl.so when it is not on the loader path.
_ASCEND_ROOT_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
_ASCEND_DEFAULT_ROOTS = ("/usr/local/Ascend/ascend-toolkit/latest", "/usr/local/Ascend/latest")


class ProviderFallbackWarning(RuntimeWarning):
    """The session runs on another execution provider than the one requested."""


@dataclass
class SessionInfo:
    """An ``ort.InferenceSession`` plus what was asked for and what was obtained."""

    session: ort.InferenceSession
    path: Path
    requested_provider: str  # "auto", "cann", "cuda" or "cpu", as passed
    chosen_provider: str  # the provider "auto" resolved to (same as requested otherwise)
    providers_in_use: list[str]
    provider_options: dict[str, str]
    optimization_level: str
    threads: int | None
    fell_back: bool
    spinning: bool = True
    warnings: list[str] = field(default_factory=list)

    @property
    def device_type(self) -> str:
        """Device name for IO binding: ``cann``, ``cuda`` or ``cpu`` (where outputs live)."""
        return _SHORT.get(self.providers_in_use[0], "cpu")

    @property
    def device_id(self) -> int:
        return int(self.provider_options.get("device_id", 0)) if self.device_type != "cpu" else 0

    def describe(self) -> str:
        """One line: providers in use, what was requested, optimisation level, threads."""
        text = f"providers: {', '.join(self.providers_in_use)} (requested {self.requested_provider}"
        if self.requested_provider == "auto":
            text += f" -> {self.chosen_provider}"
        if self.fell_back:
            text += ", FELL BACK"
        text += f"); optimization: {self.optimization_level}; threads: {self.threads or 'default'}"
        if not self.spinning:
            text += " (no spinning)"
        return text


def cann_libraries_present() -> bool:
    """Whether the CANN runtime (libascendcl) can be found, without loading it."""
    if ctypes.util.find_library("ascendcl"):
        return True
    roots = [os.environ[var] for var in _ASCEND_ROOT_VARS if os.environ.get(var)]
    roots.extend(_ASCEND_DEFAULT_ROOTS)
    return any((Path(root) / "lib64" / "libascendcl.so").is_file() for root in roots)


def resolve_provider(provider: str) -> str:
    """Resolve ``auto`` (and check a name): returns ``cann``, ``cuda`` or ``cpu``."""
    if provider not in PROVIDER_CHOICES:
        raise RuntimeUserError(
            f"unknown provider {provider!r}: use one of {', '.join(PROVIDER_CHOICES)}"
        )
    if provider != "auto":
        return provider
    available = ort.get_available_providers()
    if PROVIDERS["cann"] in available and cann_libraries_present():
        return "cann"
    if PROVIDERS["cuda"] in available:
        return "cuda"
    return "cpu"


def _check_options(provider: str, options: Mapping[str, Any]) -> dict[str, str]:
    if provider == "cpu" and options:
        raise RuntimeUserError(
            f"provider options {', '.join(sorted(options))} given for the CPU provider, which takes "
            "none: drop them or pick --provider cann/cuda"
        )
    if provider == "cann":
        unknown = sorted(set(options) - set(CANN_OPTION_KEYS))
        if unknown:
            raise RuntimeUserError(
                f"unknown CANN provider option(s) {', '.join(unknown)}: valid ones are "
                f"{', '.join(CANN_OPTION_KEYS)}"
            )
    # ONNX Runtime parses option values from strings; booleans as 1/0.
    return {
        str(key): ("1" if value else "0") if isinstance(value, bool) else str(value)
        for key, value in options.items()
    }


def _check_weights_files(path: Path) -> None:
    """One clear line when a weights file the graph names (external data) is missing or short;
    ONNX Runtime's own message for that is long and does not always name the file."""
    import onnx

    if path.stat().st_size > 64 * 1024 * 1024:  # weights inside: nothing external to check
        return
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not readable here: ONNX Runtime reports it below
        return
    needed: dict[Path, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        file = path.parent / info["location"]
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        needed[file] = max(needed.get(file, 0), end)
    for file, end in needed.items():
        if not file.is_file():
            raise RuntimeUserError(
                f"{path} keeps its weights in {file}, which is missing: keep the .onnx and its weights file together"
            )
        if file.stat().st_size < end:
            raise RuntimeUserError(
                f"weights file {file} of {path} is truncated ({file.stat().st_size} bytes, the graph needs {end}): "
                "re-export the graph or copy the file again"
            )


def create_session(
    path: str | os.PathLike,
    *,
    provider: str = "auto",
    provider_options: Mapping[str, Any] | None = None,
    optimization_level: str = "all",
    threads: int | None = None,
    spinning: bool = True,
    strict: bool = False,
    optimized_model_path: str | os.PathLike | None = None,
) -> SessionInfo:
    """Create an inference session for the ONNX graph at ``path``.

    ``provider_options`` go to the chosen accelerator provider (CANN keys are checked against
    ``CANN_OPTION_KEYS``); with ``auto`` resolving to the CPU they are dropped with a warning.
    ``threads`` sets ONNX Runtime's intra-op thread count; ``spinning=False`` stops its idle
    threads from busy-waiting for work (``session.intra_op.allow_spinning=0``), which on a
    machine shared with other jobs can be much faster. ``optimized_model_path`` writes the
    graph ONNX Runtime actually runs (after its optimiser), for inspection.
    """
    path = Path(path)
    chosen = resolve_provider(provider)
    notes: list[str] = []
    options = dict(provider_options or {})
    if provider == "auto" and chosen == "cpu" and options:
        notes.append(
            f"provider options {', '.join(sorted(options))} ignored: auto picked the CPU provider"
        )
        options = {}
    options = _check_options(chosen, options)
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise RuntimeUserError(
            f"unknown optimization level {optimization_level!r}: use one of "
            f"{', '.join(OPTIMIZATION_LEVELS)}"
        )
    if threads is not None and threads < 1:
        raise RuntimeUserError(f"threads must be at least 1 (got {threads}); leave it unset for the default")
    if not path.is_file():
        raise RuntimeUserError(f"model file {str(path)!r} does not exist: pass the path of an exported .onnx graph")
    _check_weights_files(path)

    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
    if threads is not None:
        session_options.intra_op_num_threads = threads
    if not spinning:
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        session_options.optimized_model_filepath = str(optimized_model_path)

    wanted = PROVIDERS[chosen]
    providers: list = []
    if chosen != "cpu" and wanted in ort.get_available_providers():
        providers.append((wanted, options))
    providers.append(PROVIDERS["cpu"])
    try:
        session = ort.InferenceSession(str(path), session_options, providers=providers)
    except Exception as error:  # onnxruntime raises its own pybind exception types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "NOT_IMPLEMENTED" in first_line:
            names = ", ".join(p if isinstance(p, str) else p[0] for p in providers)
            raise RuntimeUserError(
                f"ONNX Runtime has no kernel for an op of {str(path)!r} on {names} "
                f"({first_line}). A float16/bfloat16 graph on the CPU provider is the usual cause: `run`, `eval` and "
                "`calibrate` run a float32 copy of it by themselves; to time it, export with --dtype float32 or "
                "use a GPU provider"
            ) from None
        raise RuntimeUserError(
            f"ONNX Runtime could not load {str(path)!r} ({first_line}): check that it is a complete "
            "graph written by `pangu-light export` or `compile`"
        ) from None

    in_use = list(session.get_providers())
    fell_back = in_use[0] != wanted
    if fell_back:
        reason = (
            f"this onnxruntime build does not list {wanted} (it has {', '.join(ort.get_available_providers())})"
            if wanted not in ort.get_available_providers()
            else f"{wanted} is listed but could not run this graph (no device or libraries?)"
        )
        message = f"requested provider {chosen} but the session runs on {', '.join(in_use)}: {reason}"
        if strict:
            raise RuntimeUserError(message + "; drop --strict-provider to accept the fall-back")
        notes.append(message)
    for note in notes:
        warnings.warn(note, ProviderFallbackWarning, stacklevel=2)
    return SessionInfo(
        session=session,
        path=path,
        requested_provider=provider,
        chosen_provider=chosen,
        providers_in_use=in_use,
        provider_options=options,
        optimization_level=optimization_level,
        threads=threads,
        fell_back=fell_back,
        spinning=spinning,
        warnings=notes,
    )
