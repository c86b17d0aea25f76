"""Hugging Face checkpoint -> pack.

``source`` resolves and indexes the checkpoint (bounded reads), ``family`` and one module per model
family describe what the checkpoint holds, ``plan`` assigns every tensor before anything is written,
``writers`` produce expert blocks and resident files, ``pipeline`` runs it all atomically and
resumably.
"""

from .family import family_for, supported_families
from .pipeline import convert, plan_conversion
from .plan import ConversionPlan, Options
from .source import ConvertError

__all__ = [
    "convert",
    "plan_conversion",
    "ConversionPlan",
    "Options",
    "ConvertError",
    "family_for",
    "supported_families",
]
