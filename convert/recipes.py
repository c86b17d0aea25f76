"""Recipes: how many bits each kind of tensor gets, as a named preset or a small TOML file.

A recipe fills the conversion :class:`~moestream.convert.plan.Options`; flags given on the command
line still win. The manifest records the recipe's name. Example file::

    [experts]
    bits = 2            # gate_proj and up_proj
    down_bits = 3       # down_proj (default: as bits)
    group_size = 64
    method = "clip"     # rtn | clip | gptq

    [experts.tiers]     # per-expert widths from calibration routing counts (needs --calibration)
    widths = ["2g128", "2g64", "3g64", "4g64", "8g64"]
    bits_per_weight = 2.6     # mean stored bits per expert weight, over all layers
    weighted = false          # use the calibration for the widths only, not to weight the clip search

    [experts.layers]    # one width for every expert of these layers
    0 = "4g64"

    [residents]
    bits = 8
    [residents.kinds]   # router, shared_expert, attention, linear_attention, embedding, lm_head, mtp, other
    router = 16
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from .plan import RESIDENT_KINDS
from .source import ConvertError, ConvertOptionError

TIER_WIDTHS = ["2g128", "2g64", "3g64", "4g64", "8g64"]

# Per-expert tiers at the three classes of issue 6 (benchmarks/RESULTS.md has their KL on the
# trained fixture), and calibration-free mixes.
PRESETS: dict[str, dict[str, Any]] = {
    "q4-tiered": {
        "experts": {"method": "clip", "tiers": {"widths": TIER_WIDTHS, "bits_per_weight": 4.5, "weighted": False}},
        "residents": {"bits": 8},
    },
    "q3-tiered": {
        "experts": {"method": "clip", "tiers": {"widths": TIER_WIDTHS, "bits_per_weight": 3.5, "weighted": False}},
        "residents": {"bits": 8},
    },
    "q2-tiered": {
        "experts": {"method": "clip", "tiers": {"widths": TIER_WIDTHS, "bits_per_weight": 2.6, "weighted": False}},
        "residents": {"bits": 8},
    },
    "q4": {"experts": {"bits": 4, "method": "clip"}, "residents": {"bits": 8}},
    "q3": {"experts": {"bits": 3, "method": "clip"}, "residents": {"bits": 8}},
    "q2-down3": {"experts": {"bits": 2, "down_bits": 3, "method": "clip"}, "residents": {"bits": 8}},
    "q2": {"experts": {"bits": 2, "method": "clip"}, "residents": {"bits": 8}},
}

_EXPERT_KEYS = {"bits", "down_bits", "group_size", "method", "tiers", "layers"}
_TIER_KEYS = {"widths", "bits_per_weight", "weighted"}


def load_recipe(spec: str) -> dict[str, Any]:
    """Options (as keyword arguments of ``convert``) from a preset name or a TOML file."""
    if spec in PRESETS:
        return {**recipe_options(PRESETS[spec], spec), "recipe": spec}
    path = Path(spec)
    if not path.is_file():
        raise ConvertOptionError("recipe", spec, f"neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConvertError(f"{path}: not a readable TOML recipe ({e})") from None
    return {**recipe_options(data, str(path)), "recipe": path.name}


def recipe_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Translate a recipe's tables into Options fields, naming the first unknown key."""
    unknown = set(data) - {"experts", "residents"}
    ex, res = data.get("experts", {}), data.get("residents", {})
    tiers = ex.get("tiers", {})
    unknown |= {f"experts.{k}" for k in set(ex) - _EXPERT_KEYS}
    unknown |= {f"experts.tiers.{k}" for k in set(tiers) - _TIER_KEYS}
    unknown |= {f"residents.{k}" for k in set(res) - {"bits", "kinds"}}
    unknown |= {f"residents.kinds.{k}" for k in set(res.get("kinds", {})) - set(RESIDENT_KINDS)}
    if unknown:
        raise ConvertError(f"{where}: unknown recipe key {sorted(unknown)[0]}")
    out: dict[str, Any] = {}
    for key, opt in (("bits", "bits"), ("down_bits", "down_bits"), ("group_size", "group_size"), ("method", "method")):
        if key in ex:
            out[opt] = ex[key]
    if tiers:
        out["tier_widths"] = list(tiers.get("widths", TIER_WIDTHS))
        if "bits_per_weight" not in tiers:
            raise ConvertError(f"{where}: experts.tiers needs bits_per_weight (the budget)")
        out["bits_per_weight"] = float(tiers["bits_per_weight"])
        out["weighted"] = bool(tiers.get("weighted", True))
    if "layers" in ex:
        try:
            out["layer_widths"] = {int(k): str(v) for k, v in ex["layers"].items()}
        except ValueError:
            raise ConvertError(f"{where}: experts.layers keys must be layer numbers") from None
    if "bits" in res:
        out["resident_bits"] = res["bits"]
    if res.get("kinds"):
        out["resident_kinds"] = {k: int(v) for k, v in res["kinds"].items()}
    return out
