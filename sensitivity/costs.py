"""What both profilers share: the format menus, the tensors that get a format, the correction classes
and the interpolation of a calibrated gain."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moeplan import kernels
from moeplan.kernels import formats as fmts

from .adapters import TensorRole

DEFAULT_FORMATS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "BF16")
# Two error levels per group: the gain grows from 3-4 bits to 2 bits per weight, and by different
# amounts in different groups; with one level the solver picks exactly the low-bit choices whose
# damage is underestimated (on tiny-deepseek-v3 its plans then measured 1.6-1.9x their prediction,
# against 1.05x with these two). The joint correction then sets each format's level.
CALIBRATION_FORMATS = ("IQ2_XXS", "Q4_K")
QUANTIZABLE = {TensorRole.ATTENTION, TensorRole.DENSE_MLP, TensorRole.ROUTED_EXPERT, TensorRole.SHARED_EXPERT,
               TensorRole.EMBEDDING, TensorRole.HEAD}
CORRECTION_CLASSES = ("routed_experts", "other")


def menu(formats: Sequence[str] | None) -> list[str]:
    """The format names of `formats` (default: DEFAULT_FORMATS) that this build has kernels for; a
    format asked for by name that has none is an error."""
    avail = set(kernels.available_formats())
    wanted = [fmts.get(f).name for f in (formats or DEFAULT_FORMATS)]
    missing = [f for f in wanted if f not in avail]
    if missing and formats is not None:
        raise ValueError(f"formats {missing} have no kernel in this build; available: {sorted(avail)}")
    return [f for f in wanted if f in avail]


def interpolate_gain(points: list[tuple[float, float]], energy: float) -> float:
    """Gain at `energy` from calibration points (energy, gain) sorted by energy: piecewise linear in
    log-log between them, constant beyond the outermost (no extrapolated power law)."""
    pts = [(e, g) for e, g in points if e > 0 and g > 0]
    if not pts:
        return points[0][1] if points else 0.0
    if energy <= pts[0][0] or len(pts) == 1:
        return pts[0][1] if energy <= pts[0][0] else pts[-1][1]
    for (e0, g0), (e1, g1) in zip(pts, pts[1:]):
        if energy <= e1:
            t = (np.log(energy) - np.log(e0)) / (np.log(e1) - np.log(e0))
            return float(np.exp(np.log(g0) + t * (np.log(g1) - np.log(g0))))
    return pts[-1][1]
