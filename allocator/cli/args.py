"""What the commands share: the Command record, argument types that reject a bad value before any work,
and the arguments and loaders of a model, a profile and a format menu."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeplan.allocator.problem import Speed
from moeplan.kernels.checkpoint import regular_file
from moeplan.kernels import formats as fmts
from moeplan.kernels.inventory import Inventory, Target, build_inventory
from moeplan.sensitivity.profile import Profile
from moeplan.sensitivity.synthetic import LABEL, synthetic_profile

# the format menu of --synthetic-profile when --formats is not given (with --profile: the profile's own menu)
SYNTHETIC_DEFAULT_FORMATS = "Q2_K,Q3_K,Q4_K,Q6_K,Q8_0"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# argument types: a bad value is an argparse error naming the flag, before any work

def _number(kind, test, wants):
    def parse(text: str):
        try:
            v = kind(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wants}") from None
        if (kind is float and not math.isfinite(v)) or not test(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wants}")
        return v
    parse.__name__ = wants  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
nonneg_float = _number(float, lambda v: v >= 0, "a non-negative number")


# ---------------------------------------------------------------------------------------------
# shared arguments

def add_model(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", metavar="MODEL", help="checkpoint directory, config.json, an inventory JSON from "
                    "`moeplan inventory --out`, or a bundled name (deepseek-v3)")


def add_problem(ap: argparse.ArgumentParser) -> None:
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--profile", metavar="FILE", help="profile JSON from `moeplan profile`")
    src.add_argument("--synthetic-profile", action="store_true",
                     help="plan with a SYNTHETIC profile (generated costs, clearly labelled; for sizing and demos)")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="seed of the synthetic profile (default 0)")
    ap.add_argument("--target", choices=["free", "gguf"], default="free",
                    help="free: per-expert formats, per-layer counts and top-k; gguf: what llama.cpp loads (default free)")
    ap.add_argument("--formats", default=None,
                    help="comma-separated format menu (default: with --profile, every format the profile measured; "
                         f"with --synthetic-profile, {SYNTHETIC_DEFAULT_FORMATS})")
    ap.add_argument("--context", type=nonneg_int, default=4096, help="context length the KV cache must hold (default 4096)")
    ap.add_argument("--reserve", default="2GB", help="memory kept for the runtime's buffers (default 2GB)")
    ap.add_argument("--bandwidth", type=positive_float, metavar="GB/S", help="memory bandwidth, for a decode-speed constraint")
    ap.add_argument("--tokens-per-s", type=positive_float, metavar="N", help="decode speed to guarantee (needs --bandwidth)")
    ap.add_argument("--solver", choices=["lagrangian", "highs", "cbc", "cpsat"], default="lagrangian",
                    help="lagrangian (fast, proven gap; default) or an exact MIP solver")
    ap.add_argument("--time-limit", type=positive_float, default=60.0, help="seconds per solve (default 60)")
    ap.add_argument("--threads", type=positive_int, default=2, help="solver threads (default 2)")


def load_inventory(model: str):
    t0 = time.perf_counter()
    path = Path(model)
    obj = json.loads(path.read_text()) if path.suffix == ".json" and path.is_file() else None
    if isinstance(obj, dict) and "tensors" in obj and "fingerprint" in obj:
        inv = Inventory.from_json(obj)  # an inventory saved by `moeplan inventory --out`
    else:
        inv = build_inventory(model)
    say(f"inventory: {inv.model_type}, {len(inv):,} tensors, {inv.params() / 1e9:.1f}B parameters "
         f"({time.perf_counter() - t0:.1f} s)")
    return inv


def load_profile(args, inv, formats: list[str] | None):
    if args.synthetic_profile:
        say(f"profile: {LABEL}, seed {args.seed}")
        return synthetic_profile(inv, formats, seed=args.seed, target=Target(args.target))
    prof = Profile.load(args.profile)
    prof.check_against(inv)
    if prof.synthetic:
        say("profile: SYNTHETIC (generated, not measured)")
    return prof


def speed_constraint(args):
    if (args.bandwidth is None) != (args.tokens_per_s is None):
        raise ValueError("--bandwidth and --tokens-per-s go together (the speed constraint needs both)")
    return Speed.of(args.bandwidth, args.tokens_per_s) if args.bandwidth is not None else None


def format_menu(args) -> list[str]:
    """--formats, else the profile's measured menu (--profile) or SYNTHETIC_DEFAULT_FORMATS."""
    formats = args.formats
    if formats is None:
        if getattr(args, "profile", None) and not getattr(args, "synthetic_profile", False):
            return [fmts.get(f).name for f in Profile.load(args.profile).formats]
        formats = SYNTHETIC_DEFAULT_FORMATS
    try:
        return [fmts.get(f.strip()).name for f in formats.split(",") if f.strip()]
    except ValueError as exc:
        raise ValueError(f"--formats: {exc}") from None


def read_text_arg(path: str, flag: str) -> str:
    """A text file given on the command line (a regular file, UTF-8)."""
    regular_file(Path(path), flag)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
