"""Command-line options that several commands share (not a command itself).

- ``add_text_arguments``: which corpus, how much of it, and the tokenizer (calibrate, prune).
- ``add_session_arguments`` / ``session_options_from_args``: the ONNX Runtime session (run, bench).
- ``add_target_arguments`` / ``targets_from_args``: what a prune plan keeps (plan, prune).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pangu_light.calib import corpora
from pangu_light.core.errors import PanguLightError
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.session import OPTIMIZATION_LEVELS, PROVIDER_CHOICES

__all__ = [
    "add_session_arguments", "add_target_arguments", "add_text_arguments", "parse_provider_options",
    "session_options_from_args", "targets_from_args",
]


# --------------------------------------------------------------------------- text
def add_text_arguments(parser: argparse.ArgumentParser, *, role: str, samples: int | None, seq_len: int) -> None:
    """--data, --samples, --seq-len, --seed, --tokenizer, for ``role`` "calib" or "eval"."""
    default = corpora.CALIB_DEFAULT if role == "calib" else corpora.EVAL_DEFAULT
    prefix = "" if role == "calib" else "eval-"
    parser.add_argument(
        f"--{prefix}data",
        default=default,
        help=f"text: wiki, lambada, a .txt/.jsonl file, or a mixture of them joined by + (wiki+lambada: "
        f"the sequences shared evenly) (default {default}); the {role} split is used, so calibration and "
        "evaluation never share a document. A pruned model keeps most of what its calibration text "
        "exercises: calibrate on text like yours",
    )
    parser.add_argument(
        f"--{prefix}samples",
        type=int,
        default=samples,
        help=f"number of token sequences (default {samples if samples else 'all of the split'})",
    )
    parser.add_argument(
        f"--{prefix}seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})"
    )
    if role == "calib":
        parser.add_argument("--seed", type=int, default=0, help="seed for drawing the sequences (default 0)")
        parser.add_argument(
            "--tokenizer",
            type=Path,
            help="Hugging Face model directory with the tokenizer (default: the one recorded in the graph at export)",
        )


# --------------------------------------------------------------------------- ONNX Runtime session
def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The ONNX Runtime session options shared by `run` and `bench`."""
    parser.add_argument(
        "--provider", default="auto", help=f"execution provider: {', '.join(PROVIDER_CHOICES)} (default auto)"
    )
    parser.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the execution provider, e.g. device_id=0 or precision_mode=force_fp16; repeatable",
    )
    parser.add_argument(
        "--strict-provider", action="store_true", help="fail instead of falling back to the CPU provider"
    )
    parser.add_argument(
        "--optimization",
        default="all",
        choices=list(OPTIMIZATION_LEVELS),
        help="ONNX Runtime graph optimisation level (default all)",
    )
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    parser.add_argument(
        "--no-spinning",
        action="store_true",
        help="idle ONNX Runtime threads wait instead of spinning (faster on a busy machine)",
    )


def session_options_from_args(args: argparse.Namespace) -> dict:
    """``create_session`` keyword arguments from the options of ``add_session_arguments``."""
    return dict(
        provider=args.provider,
        provider_options=parse_provider_options(args.provider_option),
        optimization_level=args.optimization,
        threads=args.threads,
        spinning=not args.no_spinning,
        strict=args.strict_provider,
    )


def parse_provider_options(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` from repeated --provider-option flags -> a dict."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RuntimeUserError(f"--provider-option {item!r} is not KEY=VALUE: write e.g. device_id=0")
        options[key.strip()] = value.strip()
    return options


# --------------------------------------------------------------------------- prune targets
def _int_or_list(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _int_list(text: str) -> list[int]:
    value = _int_or_list(text)
    return value if isinstance(value, list) else [value]


def add_target_arguments(parser: argparse.ArgumentParser, *, prune: bool = False) -> None:
    """The target options; ``prune``: prune's defaults (``--spread auto``: prune runs the layer probe
    that the sensitivity spread needs, plan cannot)."""
    group = parser.add_argument_group("targets (what survives)")
    group.add_argument("--hidden", type=int, help="kept hidden size (channels ranked by S_channel)")
    group.add_argument(
        "--heads-per-group", type=_int_or_list, metavar="N[,N...]", help="query heads kept in each KV group"
    )
    group.add_argument("--kv-groups", type=_int_or_list, metavar="N[,N...]", help="KV groups kept per layer")
    group.add_argument("--ffn", type=_int_or_list, metavar="N[,N...]", help="FFN width kept per layer")
    group.add_argument("--drop-layers", type=int, metavar="N", help="drop the N layers with the lowest Block Influence")
    group.add_argument("--layers", type=_int_list, metavar="I,J,...", help="drop exactly these layers")
    group.add_argument(
        "--params", type=float, metavar="F", help="keep a fraction F of the parameters; the planner picks the widths"
    )
    group.add_argument(
        "--spread", choices=("auto", "hidden-light", "even", "sensitivity"),
        default="auto" if prune else "hidden-light",
        help="how --params shrinks the widths you did not give: hidden-light (plan's default) cuts the FFN width "
        "most, query heads per group three quarters as fast and the hidden size a fifth as fast (one-shot, the "
        "hidden size is the axis that hurts most); even cuts every width by the same factor; sensitivity (prune "
        "only) keeps hidden-light's hidden size and moves query heads and FFN neurons to the layers where "
        "removing them raises the loss least, measured by probing each layer (1 + 2 x layers model runs on the "
        "calibration text; needs prune's default --refit refit); auto (prune's default) is sensitivity for a "
        "--params budget whose heads and FFN widths you did not give (no --uniform, no --absorb-post-norms, "
        "--refit refit) and that its floors can reach (it cuts at most one query head per group and half of "
        "each FFN: Gemma-3-270M at 0.7 is beyond that), else hidden-light (plan runs no probe: hidden-light). "
        "On SmolLM2-135M at --params 0.8, LAMBADA perplexity 1.70x the unpruned model's with hidden-light, "
        "1.44x with sensitivity",
    )
    group.add_argument(
        "--selection", choices=("scores", "obs", "obs-ffn", "obs-heads"), default="scores",  # planner.SELECTIONS
        help="which query heads and FFN neurons fill the kept widths: scores (default) ranks them by the "
        "paper's S_head and S_ffn; obs (prune only) removes, one at a time, the head or neuron whose loss the "
        "refit of o_proj/down_proj can best make up for (structured Optimal Brain Surgeon on the refit's Gram "
        "matrices); obs-ffn and obs-heads do that for one axis only. The widths are the same either way",
    )
    group.add_argument(
        "--uniform", action="store_true", help="the same shape in every layer (a standard Hugging Face config)"
    )
    group.add_argument(
        "--align", type=int, default=1, metavar="N",
        help="round kept hidden/FFN widths (each layer's too, with every --spread) to multiples of N or the full "
        "width, e.g. 32 for int4 blocks",
    )
    group.add_argument(
        "--clap", action="store_true", help="merge each dropped layer's best KV groups into its neighbour (CLAP)"
    )
    group.add_argument(
        "--clap-groups",
        default="keep",
        metavar="keep|sum|N",
        help="KV groups of a layer after a CLAP merge: keep its own count (default), sum (all candidates), or N",
    )
    group.add_argument(
        "--clap-margin",
        type=float,
        default=1.5,
        metavar="F",
        help="a dropped layer's KV group must outscore the receiver's own groups by this factor to replace one "
        "(the receiver's scores are multiplied by F when ranking; default 1.5, which with prune's receiver refit "
        "measured better than plain removal one-shot; 1 is the paper's plain ranking)",
    )
    group.add_argument(
        "--clap-adjacent",
        action="store_true",
        help="merge only a removed layer directly after its receiver; others are plainly removed",
    )
    group.add_argument("--no-slnp", action="store_true", help="do not rescale pruned norm gammas (ablation)")
    group.add_argument(
        "--absorb-post-norms", action="store_true", help="fold post-norms into o_proj/down_proj (sandwich models)"
    )
    group.add_argument(
        "--absorb-max-spread",
        type=float,
        metavar="S",
        help="with --absorb-post-norms, absorb only post-norms whose input's log(1/rms) varies over the "
        "calibration tokens by a standard deviation of at most S, and keep the others as real norms. "
        "Absorbing all (the paper) breaks Gemma-3-270M one-shot; S=0.15 absorbs 7 of its 36 and costs "
        "about 1%% perplexity, S=0.2 absorbs 13 and costs about 4%%",
    )


def targets_from_args(args: argparse.Namespace):
    from pangu_light.calib.planner import Targets

    return Targets(
        hidden=args.hidden,
        heads_per_group=args.heads_per_group,
        kv_groups=args.kv_groups,
        ffn=args.ffn,
        drop_layers=args.drop_layers,
        layers=args.layers,
        params=args.params,
        spread=args.spread,
        selection=args.selection,
        uniform=args.uniform,
        align=args.align,
        clap=args.clap,
        slnp=not args.no_slnp,
        absorb_post_norms=args.absorb_post_norms,
        absorb_max_spread=args.absorb_max_spread,
        clap_groups=_clap_groups(args.clap_groups),
        clap_margin=args.clap_margin,
        clap_adjacent=args.clap_adjacent,
    )


def _clap_groups(text: str) -> int | str:
    if text in ("keep", "sum"):
        return text
    try:
        return int(text)
    except ValueError:
        raise PanguLightError(f"--clap-groups {text!r}: use keep, sum or a number of KV groups") from None
