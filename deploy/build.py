"""Build a deployment graph from one of our decode graphs and record what was done.

    decode graph --fuse-gqa--> GroupQueryAttention per layer (rotary inside, shareable KV buffer)
                 --fold-weight-transpose--> MatMul-ready weights
                 --pack-qkv--> one q|k|v MatMul per GQA (where nothing sits between them)
                 --fuse-norms--> (Skip)SimplifiedLayerNormalization
                 --(int8/int4) ORT quantizer [--quant-method gptq: deploy.gptq's weights]
                 --> OUTDIR/model.onnx (+ .data when large), deploy.json

``io_kind`` in the record tells the runtime how to feed the graph: ``gqa-shared-buffer`` when
every layer's attention was fused (past and present may be one pre-allocated buffer of fixed
capacity; ``runtime.generate`` binds them so), else ``past-present`` (past of P positions in,
present of P + S out, as the export writes it). ``fuse=False`` keeps the export's attention
and norms (the graph before this module's fusions existed). ``padding_bias=False`` builds GQA
without the padding bias (faster; the record's ``padding_bias`` makes the runtime refuse
batches with padding for it).

fp32 stops after the fold (the function is unchanged). int8/int4 quantize every eligible MatMul
(the projections of every layer and the lm_head: at ``lm_head_weights`` when given, else at
``weights`` except int8 under int4 (``DeployOptions.head_weights``, measured there);
``quantize_lm_head=False`` keeps it float32); the embedding Gather keeps float32 weights. A tied
lm_head is folded into its own copy only when it is to be quantized, so an fp32 deployment stores
the tied matrix once. ``quant_method="gptq"`` keeps the quantizer's nodes and layouts but replaces
their packed weights and scales by GPTQ's (``deploy.gptq``), from the input Grams of every
quantized MatMul collected through the float32 graph about to be quantized, on calibration token
windows (``build_deployment`` cuts them from ``calib_data``'s calib split with the graph's tokenizer).
``quant_method="auto"`` (the CLI's default) is resolved by ``build_deployment``: GPTQ where the text
and the tokenizer are at hand and the blocks are symmetric, else round to nearest, the reason kept
in the record's ``quant_method_fallback``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import write_json
from pangu_light.deploy.genai_package import genai_config, write_genai_package
from pangu_light.deploy.gptq import QuantizedWeight, collect_input_grams, gptq_quantize, overwrite_packed
from pangu_light.deploy.quantize import BITS, eligible_matmuls, lm_head_matmul, name_unnamed_nodes, quantize_weights
from pangu_light.passes.deploy.fold_weight_transpose import FoldWeightTransposePass
from pangu_light.passes.deploy.fuse_gqa import IO_KIND_GQA, FuseGQAPass
from pangu_light.passes.deploy.fuse_norms import FuseNormsPass
from pangu_light.passes.deploy.pack_qkv import PackQKVPass
from pangu_light.passes.infra.graph_io import load_model, refuse_overwrite_input, save_model_atomic

__all__ = ["DeployOptions", "IO_KIND_GQA", "IO_KIND_PAST_PRESENT", "WEIGHTS", "build_deployment", "deploy_graph"]

WEIGHTS = ("fp32", "int8", "int4")
QUANT_METHODS = ("rtn", "gptq", "auto")
DEPLOY_KEY = "pangu_light.deploy"  # model metadata: the deploy.json record, as JSON
IO_KIND_PAST_PRESENT = "past-present"
DEFAULT_MAX_LENGTH = 4096  # rotary cache positions when the source config does not say


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    weights: str = "int4"
    block_size: int = 32
    quantize_lm_head: bool = True
    lm_head_weights: str = ""  # the lm_head's own weight type (fp32/int8/int4); "": head_weights()
    symmetric: bool = True
    accuracy_level: int = 4
    provider: str = "cpu"
    fuse: bool = True
    max_length: int = 0  # rotary cache positions; 0: the source config's max_position_embeddings
    padding_bias: bool = True  # False: no attention_bias in GQA; the runtime refuses padded batches
    # "gptq": deploy.gptq's weights from calibration text (symmetric only); "auto" (the CLI's default):
    # gptq where build_deployment finds the text and the tokenizer, else rtn
    quant_method: str = "rtn"
    calib_data: str = "wiki"  # GPTQ's calibration text (a corpus name, as calibrate's --data)
    calib_samples: int = 32  # GPTQ's calibration windows of calib_seq_len tokens
    calib_seq_len: int = 256
    gptq_damp: float = 0.01  # GPTQ's damping: this times mean(diag H) added to H's diagonal

    def check(self) -> None:
        if self.weights not in WEIGHTS:
            raise PanguLightError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.lm_head_weights not in ("", *WEIGHTS):
            raise PanguLightError(f"--lm-head {self.lm_head_weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.weights == "fp32" and self.head_weights() != "fp32":
            raise PanguLightError("--lm-head int8/int4 needs --weights int8/int4 (an fp32 graph keeps its lm_head)")
        if self.provider != "cpu":
            raise PanguLightError(
                f"--provider {self.provider}: only cpu deployment graphs are built so far; use --provider cpu"
            )
        if self.max_length < 0:
            raise PanguLightError(f"--max-length {self.max_length} must be positive (or 0 for the model's own)")
        if not self.padding_bias and not self.fuse:
            raise PanguLightError("--no-padding-bias applies to the fused GroupQueryAttention: drop it or --no-fuse")
        if self.quant_method not in QUANT_METHODS:
            raise PanguLightError(f"--quant-method {self.quant_method!r} is not one of {', '.join(QUANT_METHODS)}")
        if self.quant_method == "gptq":
            if self.weights == "fp32":
                raise PanguLightError("--quant-method gptq needs --weights int8/int4 (fp32 has nothing to quantize)")
            if not self.symmetric:
                raise PanguLightError("--quant-method gptq writes symmetric blocks: drop --asymmetric")
        if self.quant_method in ("gptq", "auto"):
            if self.calib_samples < 1 or self.calib_seq_len < 2:
                raise PanguLightError(f"--calib-samples {self.calib_samples} and --calib-seq-len "
                                      f"{self.calib_seq_len} must be at least 1 and 2")
            if not self.gptq_damp > 0:
                raise PanguLightError(f"--gptq-damp {self.gptq_damp} must be positive")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PanguLightError(f"--accuracy-level {self.accuracy_level} is not one of 0-4 (MatMulNBits)")


    def head_weights(self) -> str:
        """The lm_head's weight type: fp32 when not quantized, else its own; by default as
        ``weights``, except int8 under int4 projections. Measured on SmolLM2-135M (LAMBADA 4 x 256,
        1 thread): an int4 lm_head alone raises perplexity 54.0 -> 59.5 over an fp32 one, an
        int8 lm_head to 54.1, for 1.1 ms of a 28 ms int4 decode step (fp32: 10 ms)."""
        if not self.quantize_lm_head:
            return "fp32"
        return self.lm_head_weights or ("int8" if self.weights == "int4" else self.weights)


def deploy_graph(
    model: ir.Model, options: DeployOptions, calibration: np.ndarray | None = None
) -> tuple[ir.Model, dict[str, Any]]:
    """The deployment graph of ``model`` (a decode or no-cache graph of ours) and the record.
    ``model`` itself is folded in place (the fold pass is an in-place pass); pass a copy to keep it.
    ``calibration``: token windows [n, length] for ``quant_method="gptq"`` (required there)."""
    options.check()
    if options.quant_method == "auto":
        raise PanguLightError("--quant-method auto is resolved by build_deployment: pass rtn or gptq")
    if options.quant_method == "gptq" and calibration is None:
        raise PanguLightError("--quant-method gptq needs calibration token windows")
    metadata = {p: v for p, v in model.metadata_props.items()}
    before = _op_counts(model)
    quantize = options.weights != "fp32"
    record: dict[str, Any] = {"options": dataclasses.asdict(options), "io_kind": IO_KIND_PAST_PRESENT}
    if options.fuse:
        # Pruned graphs carry values without types; onnxscript's norm rules need them.
        common_passes.ShapeInferencePass()(model)
        gqa = FuseGQAPass({"max_length": options.max_length or _config_max_length(metadata),
                           "padding_bias": options.padding_bias})
        gqa(model)
        record["fuse_gqa"] = dict(gqa.stats)
        layers = sum(1 for name in metadata_inputs(model) if name.endswith(".key"))
        if layers and gqa.stats.get("fused", 0) == layers:
            record["io_kind"] = IO_KIND_GQA
            record["max_length"] = gqa.options["max_length"]
            record["padding_bias"] = options.padding_bias
    head_weights = options.head_weights()
    fold = FoldWeightTransposePass({"shared": quantize and head_weights != "fp32"})
    fold(model)
    record["fold_weight_transpose"] = dict(fold.stats)
    if options.fuse:
        pack = PackQKVPass()
        pack(model)
        record["pack_qkv"] = dict(pack.stats)
        norms = FuseNormsPass()
        norms(model)
        record["fuse_norms"] = dict(norms.stats)
    if quantize:  # the quantizer reads the weights from the proto: bring external data into memory
        model = ir.external_data.load_to_model(model)
    proto = ir.serde.serialize_model(model)  # external tensors (fp32) stay references: cheap
    eligible = eligible_matmuls(proto)
    record["eligible_matmuls"] = len(eligible)
    record["lm_head_quantized"] = False
    deployed = model  # fp32: the rewritten graph itself (its external weights still mapped)
    if quantize:
        name_unnamed_nodes(proto)  # the quantizer excludes nodes by name
        head = lm_head_matmul(proto, contract.LOGITS)
        exclude = [head.name] if head is not None and head_weights != options.weights else []
        settings = {"block_size": options.block_size, "symmetric": options.symmetric,
                    "accuracy_level": options.accuracy_level}
        bits = {n.input[1]: BITS[options.weights] for n in eligible if n.name not in exclude}
        if head is not None and head_weights != "fp32":
            bits[head.input[1]] = BITS[head_weights]
        sources = {n.output[0]: n.input[1] for n in eligible if n.input[1] in bits}
        # GPTQ taps ``model`` itself (consumed: from here on only ``proto`` is used)
        gptq = _gptq_weights(model, proto, bits, calibration, options) if options.quant_method == "gptq" else None
        proto = quantize_weights(proto, bits=BITS[options.weights], exclude=exclude, **settings)
        if exclude and head_weights != "fp32":  # the lm_head alone, at its own width
            others = [n.name for n in eligible_matmuls(proto) if n.name != head.name]
            proto = quantize_weights(proto, bits=BITS[head_weights], exclude=others, **settings)
        if gptq is not None:
            record["gptq"] = {"weights": overwrite_packed(proto, gptq, sources), "damp": options.gptq_damp,
                              "calibration": {"data": options.calib_data, "windows": int(calibration.shape[0]),
                                              "seq_len": int(calibration.shape[1])}}
        record["lm_head_quantized"] = head is not None and head_weights != "fp32"
        record["lm_head_weights"] = head_weights if head is not None else None
        record["excluded_nodes"] = exclude if head_weights == "fp32" else []
        deployed = ir.serde.deserialize_model(proto)
    after = _op_counts(deployed)
    record["matmul_nbits"] = after.get("MatMulNBits", 0)
    record["nodes_before"], record["nodes_after"] = sum(before.values()), sum(after.values())
    record["ops_after"] = dict(sorted(after.items()))
    record["weight_bytes"] = sum(
        v.const_value.nbytes for v in deployed.graph.initializers.values() if v.const_value is not None
    )
    for key, value in metadata.items():
        deployed.metadata_props.setdefault(key, value)
    deployed.metadata_props[DEPLOY_KEY] = json.dumps(record, sort_keys=True)
    return deployed, record


def _gptq_weights(model: ir.Model, proto: onnx.ModelProto, bits: dict[str, int], calibration: np.ndarray,
                  options: DeployOptions) -> dict[str, QuantizedWeight]:
    """GPTQ of every weight in ``bits`` (name -> its bits), from the input Grams of the MatMuls that
    read them, collected through ``model`` (the float32 graph about to be quantized; consumed by the
    taps), each weight read from ``proto`` (the same graph, serialized) only when its turn comes."""
    from tqdm import tqdm

    from pangu_light.calib.stats import batched

    with tqdm(total=int(calibration.size), unit="tok", desc="GPTQ input Grams", file=sys.stderr) as bar:
        grams = collect_input_grams(model, bits, batched(calibration, 4), on_batch=bar.update)
    initializers = {t.name: t for t in proto.graph.initializer if t.name in bits}
    quantized = {}
    for name in tqdm(sorted(bits), unit="weight", desc="GPTQ", file=sys.stderr):
        quantized[name] = gptq_quantize(onnx.numpy_helper.to_array(initializers[name]), grams.pop(name),
                                        bits=bits[name], block_size=options.block_size, damp=options.gptq_damp)
    return quantized


def build_deployment(
    source: str | Path, outdir: str | Path, options: DeployOptions, *, genai_tokenizer: Path | None | bool = False,
    calibration: np.ndarray | None = None, tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Read ``source``, write ``outdir/model.onnx`` and ``outdir/deploy.json``; returns the record.
    ``genai_tokenizer`` (a directory, or None for the one the graph records) also writes an ONNX
    Runtime GenAI package (``deploy.genai_package``); False (the default) does not. GPTQ's
    ``calibration`` windows default to ``options.calib_data``'s calib split, cut with the graph's
    tokenizer (``tokenizer``: another tokenizer directory)."""
    outdir = Path(outdir)
    target = outdir / "model.onnx"
    refuse_overwrite_input(target, source)
    if outdir.exists() and not outdir.is_dir():
        raise PanguLightError(f"{outdir} exists and is not a directory: choose another -o")
    model = load_model(source)
    options, calibration, fallback = _resolve_quant_method(options, source, model, tokenizer, calibration)
    deployed, record = deploy_graph(model, options, calibration)
    if fallback:
        record["quant_method_fallback"] = fallback
    record["source"] = str(Path(source).resolve())
    record["graph_kind"] = model.metadata_props.get(contract.GRAPH_KIND, "unknown")
    record["versions"] = _versions()
    if genai_tokenizer is not False:
        genai_config(deployed, record)  # refuse (per-layer shapes, unfused) before writing anything
    deployed.metadata_props[DEPLOY_KEY] = json.dumps(record, sort_keys=True)  # with the source named
    save_model_atomic(deployed, target)
    record["model"] = str(target)
    if genai_tokenizer is not False:
        record["genai_package"] = write_genai_package(outdir, deployed, record, genai_tokenizer or None)
    write_json(outdir / "deploy.json", record)
    return record


def _resolve_quant_method(
    options: DeployOptions, source: str | Path, model: ir.Model, tokenizer: Path | None, calibration: np.ndarray | None,
) -> tuple[DeployOptions, np.ndarray | None, str | None]:
    """(options with rtn or gptq, GPTQ's calibration windows, why auto fell back to rtn or None).
    ``quant_method="auto"`` takes GPTQ for int weights with symmetric blocks when the calibration
    text can be cut with the graph's tokenizer (or ``calibration`` is given), else round to nearest."""
    if options.quant_method == "rtn":
        return options, calibration, None
    if options.quant_method == "gptq":
        return options, calibration if calibration is not None else calibration_windows(
            source, model, options, tokenizer), None
    rtn = dataclasses.replace(options, quant_method="rtn")
    if options.weights == "fp32":
        return rtn, None, None
    if not options.symmetric:
        return rtn, None, "GPTQ writes symmetric blocks and --asymmetric was given"
    if calibration is None:
        try:
            calibration = calibration_windows(source, model, options, tokenizer)
        except PanguLightError as error:
            return rtn, None, f"GPTQ's calibration text could not be prepared ({error})"
    return dataclasses.replace(options, quant_method="gptq"), calibration, None


def calibration_windows(source: str | Path, model: ir.Model, options: DeployOptions,
                        tokenizer: Path | None = None) -> np.ndarray:
    """GPTQ's token windows [calib_samples, calib_seq_len] from ``options.calib_data``'s calib split."""
    from pangu_light.calib.text import graph_tokenizer, sequences_for

    metadata = {key: value for key, value in model.metadata_props.items()}
    encode, bos_id = graph_tokenizer(source, metadata, tokenizer)
    return sequences_for(options.calib_data, encode, bos_id, samples=options.calib_samples,
                         seq_len=options.calib_seq_len, seed=0, split="calib")


def metadata_inputs(model: ir.Model) -> list[str]:
    """The past_key_values.* input names of ``model``."""
    return [v.name for v in model.graph.inputs if v.name.startswith(contract.PAST_PREFIX)]


def _config_max_length(metadata: dict[str, str]) -> int:
    """max_position_embeddings of the source config recorded in the graph, else the default."""
    try:
        config = json.loads(metadata.get(contract.SOURCE_CONFIG, "{}"))
    except ValueError:
        return DEFAULT_MAX_LENGTH
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_MAX_LENGTH


def _op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph.all_nodes())


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnx_ir": ir.__version__, "onnxruntime": onnxruntime.__version__}
