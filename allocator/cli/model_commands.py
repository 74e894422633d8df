"""`moeplan profile` and `moeplan evaluate`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from moeplan.allocator.plan import Plan
from moeplan.kernels.inventory import build_inventory, resolve_model
from moeplan.kernels.outputs import check_output
from moeplan.sensitivity.costs import DEFAULT_FORMATS
from moeplan.sensitivity.importance import importance_path, importance_vectors

from .args import Command, positive_int, read_text_arg
from .evaluation import Evaluator, held_out_windows


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- profile ----------------------------------------------------------------------------------

def _profile_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", metavar="MODEL", help="checkpoint directory or a shipped reference model name")
    ap.add_argument("--calib", metavar="FILE", help="calibration text (default: the model's shipped calib.txt)")
    ap.add_argument("--out", metavar="PROFILE", required=True, help="profile JSON to write (importance vectors go "
                    "next to it as PROFILE.importance.safetensors)")
    ap.add_argument("--formats", help="comma-separated format menu (default: %(default)s)",
                    default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--tokens", type=positive_int, default=4096, help="calibration tokens (default: %(default)s)")
    ap.add_argument("--seq-len", type=positive_int, default=128, help="calibration window length (default: %(default)s)")
    ap.add_argument("--method", choices=("layerwise", "passes"), default="layerwise",
                    help="layerwise (default): the checkpoint streamed one decoder layer at a time, any size, "
                         "resumable; passes: the in-memory reference profiler (the whole model in float32 RAM)")
    ap.add_argument("--removal", choices=("auto", "streams", "fisher"), default="auto",
                    help="expert removal costs (layerwise): streams, one per expert, measured end to end; fisher, "
                         "the Fisher metric of each layer's output (one backward sweep, for models with many "
                         "experts); auto (default): streams up to 2048 routed experts")
    ap.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda / cuda:N (layerwise)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="compute dtype (default auto: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--threads", type=positive_int, help="CPU threads for torch and the kernels (default: all)")
    ap.add_argument("--imatrix", metavar="FILE", help="also write the importance vectors as a llama.cpp imatrix "
                    "GGUF (for llama-quantize --imatrix; layerwise)")
    ap.add_argument("--activations-ram", type=_gib, metavar="GB",
                    help="RAM for the hidden-state streams (layerwise; default: half of the memory available); the "
                         "rest is written to --activations-dir")
    ap.add_argument("--activations-dir", metavar="DIR", help="where streams beyond --activations-ram go "
                    "(default: the directory of --out)")
    ap.add_argument("--stream-share", type=_share, default=None, metavar="S",
                    help="share of the calibration windows the gain and joint-correction streams carry (layerwise; "
                         "default 0.25; 1: every window)")
    ap.add_argument("--error-rows", type=_rows, default=None, metavar="N",
                    help="the error kernel estimates a matrix from N seeded rows, doubled until the relative "
                         "standard error is at most 5%% (a sample of a quarter of the rows or more: every row) "
                         "(layerwise; default 64; the profile's meta states the sample); 0: every row")
    ap.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="measure on Ray workers (layerwise; needs the ray extra): alone, a local cluster on this "
                         "machine; 'auto' or host:port, a running cluster whose nodes all see MODEL at the same path")
    ap.add_argument("--workers", type=positive_int, metavar="N",
                    help="Ray workers (with --ray; default: one per GPU of the cluster, else one per CPU, at most "
                         "one per calibration batch of 8 windows)")


def _gib(s: str) -> int:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"{s!r}: give a number of GB >= 0 (0: every stream on disk)")
    return int(v * (1 << 30))


def _share(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{s!r}: give a share of the windows in (0, 1]")
    return v


def _rows(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: give a whole number of rows >= 0 (0: every row)")
    return v


def _device(s: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"{s!r}: use cpu, cuda or cuda:N")
    if s.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s}: this torch build sees no CUDA device; use --device cpu")
        n = int(s.split(":")[1]) if ":" in s else 0
        if n >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return s


def _profile_run(args) -> int:
    import torch

    from moeplan.sensitivity.profiler import profile_model, state_path

    check_output(args.out, "--out")
    check_output(importance_path(args.out), "--out (its importance file)")
    if args.imatrix:
        check_output(args.imatrix, "--imatrix")
        if args.method != "layerwise":
            raise ValueError("--imatrix needs --method layerwise (it records the token counts llama.cpp needs)")
    if args.method != "layerwise" and (args.activations_ram is not None or args.activations_dir):
        raise ValueError("--activations-ram / --activations-dir are for --method layerwise (the in-memory profiler "
                         "keeps no streams)")
    if args.method != "layerwise" and (args.error_rows is not None or args.stream_share is not None):
        raise ValueError("--error-rows / --stream-share are for --method layerwise (the in-memory profiler measures "
                         "every row and runs every window)")
    if args.activations_dir and not os.path.isdir(args.activations_dir):
        raise ValueError(f"--activations-dir {args.activations_dir} is not a directory: create it or give another")
    if args.workers is not None and args.ray is None:
        raise ValueError("--workers is for --ray (the number of Ray workers); add --ray or leave it out")
    if args.ray is not None:
        if args.method != "layerwise":
            raise ValueError("--ray needs --method layerwise (the in-memory profiler runs in one process)")
        if state_path(args.out).exists():
            raise ValueError(f"{state_path(args.out)} is the resumable state of an interrupted single-process profile "
                             "and --ray does not resume it: run without --ray to resume, or remove it")
        from moeplan.sensitivity.distributed import import_ray

        import_ray()
    elif args.method == "layerwise" and state_path(args.out).exists():
        _say(f"resuming from {state_path(args.out)} (remove it to start again)")
    text = read_text_arg(args.calib, "--calib") if args.calib else None
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    prof = profile_model(args.model, text, out=args.out, formats=args.formats.split(","), max_tokens=args.tokens,
                         seq_len=args.seq_len, progress=True, method=args.method, device=args.device, dtype=dtype,
                         threads=args.threads, imatrix_out=args.imatrix, removal=args.removal,
                         activations_ram=args.activations_ram, activations_dir=args.activations_dir,
                         **({} if args.error_rows is None else {"error_rows": args.error_rows}),
                         **({} if args.stream_share is None else {"stream_share": args.stream_share}),
                         ray=args.ray, workers=args.workers)
    m = prof.meta
    fpe = f", {m['full_pass_equivalents']} full-pass equivalents" if "full_pass_equivalents" in m else ""
    sampling = m.get("error_sampling", {})
    if sampling.get("sampled_matrices"):
        _say(f"error kernel: {sampling['sampled_matrices']} of {sampling['matrices']} matrices estimated from a "
             f"sample of their rows ({sampling['share_of_rows_measured']:.1%} of the rows measured; relative "
             f"standard error: mean {sampling['mean_relative_se']:.2%}, "
             f"max {sampling['max_relative_se']:.2%}; --error-rows 0 measures every row)")
    disk = m.get("activations", {}).get("peak_bytes_on_disk", 0)
    if disk:
        _say(f"hidden-state streams beyond the RAM budget: up to {disk / 2**30:.2f} GB on disk in "
             f"{m['activations']['directory']}")
    if "ray" in m:
        _say(f"measured by {m['ray']['workers']} Ray worker(s) ({m['ray']['address']}), restarts "
             f"{sum(m['ray']['restarts'])}")
    _say(f"profile of {args.model}: {len(prof.tensor_damage)} tensors x {len(prof.formats)} formats, "
         f"{sum(s.n_experts for s in prof.experts.values())} experts, {m['calibration_tokens']} calibration tokens, "
         f"{m['seconds']['total']:.0f} s{fpe} -> {args.out}" + (f" (+ imatrix {args.imatrix})" if args.imatrix else ""))
    return 0


# ---- evaluate ---------------------------------------------------------------------------------

def _evaluate_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", metavar="MODEL", help="checkpoint directory or a shipped reference model name")
    ap.add_argument("--plan", metavar="FILE", help="plan JSON to apply (without: the unmodified model)")
    ap.add_argument("--text", metavar="FILE", help="held-out text (default: the model's shipped valid.txt)")
    ap.add_argument("--tokens", type=positive_int, default=8192, help="evaluation tokens (default: %(default)s)")
    ap.add_argument("--seq-len", type=positive_int, default=128, help="window length (default: %(default)s)")
    ap.add_argument("--importance", metavar="FILE", help="importance vectors for quantizing: a .safetensors from "
                    "`moeplan profile` or a llama-imatrix file (GGUF or legacy .dat) (default: the model's shipped "
                    "profile.importance.safetensors, if any)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")


def evaluate_plan(model: str, plan_path: str | None = None, text: str | None = None, tokens: int = 8192,
                  seq_len: int = 128, importance_file: str | None = None):
    """Perplexity, KL to the original and top-1 agreement of MODEL compressed under a plan (API)."""
    from moeplan.sensitivity.evaluate import load_model_and_text

    plan = inventory = None
    importance = (None, None)
    if plan_path is not None:  # the plan and the importance are checked before the model is loaded
        inventory = build_inventory(model)
        plan = Plan.load(plan_path, inventory)
        importance = importance_vectors(resolve_model(model), importance_file or None, "--importance")
    path, original, ids = load_model_and_text(model, text, "valid", "evaluation", "--text")
    evaluator = Evaluator.of_model(path, original, held_out_windows(ids, seq_len, tokens), importance,
                                   inventory=inventory)
    return evaluator(plan) if plan is not None else evaluator.evaluate()


def _evaluate_run(args) -> int:
    r = evaluate_plan(args.model, args.plan, read_text_arg(args.text, "--text") if args.text else None, args.tokens,
                      args.seq_len, args.importance)
    if args.json:
        print(json.dumps(r.as_dict(), indent=1))
    else:
        print(f"{'tokens':<22}{r.n_tokens}")
        print(f"{'perplexity':<22}{r.perplexity:.4f}  (original {r.reference_perplexity:.4f})")
        print(f"{'KL mean (nats/token)':<22}{r.kld_mean:.5f}")
        print(f"{'KL p99 (nats/token)':<22}{r.kld_p99:.5f}")
        print(f"{'top-1 agreement':<22}{r.top1_agreement:.4f}")
    return 0


COMMANDS = [
    Command("profile", "measure a model's sensitivity profile on calibration text", _profile_args, _profile_run),
    Command("evaluate", "perplexity, KL and top-1 agreement of a model under a plan", _evaluate_args, _evaluate_run),
]
