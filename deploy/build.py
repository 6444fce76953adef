"""Build a deployment graph from one of our decode graphs and record what was done.

    decode graph --fold-weight-transpose--> MatMul-ready weights --(int8/int4) ORT quantizer-->
    OUTDIR/model.onnx (+ model.onnx.data when large) and OUTDIR/deploy.json

fp32 stops after the fold (the function is unchanged). int8/int4 quantize every eligible MatMul
(the projections of every layer and, unless ``quantize_lm_head=False``, the lm_head); the
embedding Gather keeps float32 weights. A tied lm_head is folded into its own copy only when it
is to be quantized, so an fp32 deployment stores the tied matrix once.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from pangu_light.core import contract
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import write_json
from pangu_light.deploy.quantize import BITS, eligible_matmuls, lm_head_matmul, name_unnamed_nodes, quantize_weights
from pangu_light.passes.deploy.fold_weight_transpose import FoldWeightTransposePass
from pangu_light.passes.infra.graph_io import load_model, refuse_overwrite_input, save_model_atomic

__all__ = ["DeployOptions", "WEIGHTS", "build_deployment", "deploy_graph"]

WEIGHTS = ("fp32", "int8", "int4")
DEPLOY_KEY = "pangu_light.deploy"  # model metadata: the deploy.json record, as JSON


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    weights: str = "int4"
    block_size: int = 32
    quantize_lm_head: bool = True
    symmetric: bool = True
    accuracy_level: int = 4
    provider: str = "cpu"

    def check(self) -> None:
        if self.weights not in WEIGHTS:
            raise PanguLightError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.provider != "cpu":
            raise PanguLightError(
                f"--provider {self.provider}: only cpu deployment graphs are built so far; use --provider cpu"
            )
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PanguLightError(f"--accuracy-level {self.accuracy_level} is not one of 0-4 (MatMulNBits)")


def deploy_graph(model: ir.Model, options: DeployOptions) -> tuple[ir.Model, dict[str, Any]]:
    """The deployment graph of ``model`` (a decode or no-cache graph of ours) and the record.
    ``model`` itself is folded in place (the fold pass is an in-place pass); pass a copy to keep it."""
    options.check()
    metadata = {p: v for p, v in model.metadata_props.items()}
    before = _op_counts(model)
    quantize = options.weights != "fp32"
    fold = FoldWeightTransposePass({"shared": quantize and options.quantize_lm_head})
    fold(model)
    proto = ir.serde.serialize_model(model)
    eligible = eligible_matmuls(proto)
    record: dict[str, Any] = {
        "options": dataclasses.asdict(options),
        "fold_weight_transpose": dict(fold.stats),
        "eligible_matmuls": len(eligible),
        "lm_head_quantized": False,
    }
    if quantize:
        name_unnamed_nodes(proto)  # the quantizer excludes nodes by name
        head = lm_head_matmul(proto, contract.LOGITS)
        exclude = [head.name] if head is not None and not options.quantize_lm_head else []
        proto = quantize_weights(
            proto,
            bits=BITS[options.weights],
            block_size=options.block_size,
            symmetric=options.symmetric,
            accuracy_level=options.accuracy_level,
            exclude=exclude,
        )
        record["lm_head_quantized"] = head is not None and options.quantize_lm_head
        record["excluded_nodes"] = exclude
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


def build_deployment(source: str | Path, outdir: str | Path, options: DeployOptions) -> dict[str, Any]:
    """Read ``source``, write ``outdir/model.onnx`` and ``outdir/deploy.json``; returns the record."""
    outdir = Path(outdir)
    target = outdir / "model.onnx"
    refuse_overwrite_input(target, source)
    if outdir.exists() and not outdir.is_dir():
        raise PanguLightError(f"{outdir} exists and is not a directory: choose another -o")
    model = load_model(source)
    deployed, record = deploy_graph(model, options)
    record["source"] = str(Path(source).resolve())
    record["graph_kind"] = model.metadata_props.get(contract.GRAPH_KIND, "unknown")
    record["versions"] = _versions()
    save_model_atomic(deployed, target)
    record["model"] = str(target)
    write_json(outdir / "deploy.json", record)
    return record


def _op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph.all_nodes())


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnx": onnx.__version__, "onnx_ir": ir.__version__, "onnxruntime": onnxruntime.__version__}
