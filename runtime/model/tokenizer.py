"""The pack's tokenizer through mlx-lm's wrapper."""

from __future__ import annotations

from pathlib import Path

from moestream.layouts import PackError


def load_tokenizer(root: Path):
    """mlx-lm's tokenizer wrapper for the pack, faithful to the pack's ``tokenizer.json``.

    transformers 5 picks the tokenizer class from ``model_type`` (Qwen3_5Tokenizer, which rebuilds
    the pre-tokenizer from its own regex) even when ``tokenizer_config.json`` names the generic
    ``PreTrainedTokenizerFast``; for such checkpoints the backend is reset to ``tokenizer.json`` as
    written, which is what the model was trained with.
    """
    import json

    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    if not (root / "tokenizer.json").exists() and not (root / "tokenizer_config.json").exists():
        raise PackError(f"{root}: no tokenizer files in the pack")
    wrapper = mlx_load_tokenizer(root)
    cfg = root / "tokenizer_config.json"
    declared = json.loads(cfg.read_text()).get("tokenizer_class") if cfg.exists() else None
    inner = wrapper._tokenizer
    if (
        declared in ("PreTrainedTokenizerFast", "TokenizersBackend")
        and type(inner).__name__ != declared
        and (root / "tokenizer.json").exists()
        and hasattr(inner, "_tokenizer")
    ):
        from tokenizers import Tokenizer

        inner._tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    return wrapper
