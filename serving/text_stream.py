"""Generated ids -> text deltas for the stream, with stop strings cut out.

Each delta is released only when it is complete text (the tokenizer's `IncrementalDecoder` holds
back split UTF-8 sequences) and cannot turn out to be the start of a stop string: the longest
tail that is a proper prefix of some stop string is held until the next tokens decide it.

    ts = TextStream(tokenizer, prompt_ids, stop=("\\n\\n",))
    text, stopped = ts.add([12, 7])     # text to send now; stopped: a stop string matched
    text = ts.finish()                  # at the end: whatever was held back
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()):
        self._decoder = tokenizer.incremental_decoder(prompt_token_ids)
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0  # characters of _text already released
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._ids.extend(int(t) for t in token_ids)
        self._text += self._decoder.step(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._text += self._decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        # A match cannot start before _sent: its start was held back as a stop prefix.
        hits = [i for i in (self._text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            end = min(hits)
            out, self._sent, self.stopped = self._text[self._sent : end], end, True
            return out, True
        end = len(self._text) if final else len(self._text) - self._held_tail()
        out, self._sent = self._text[self._sent : end], max(self._sent, end)
        return out, False

    def _held_tail(self) -> int:
        """Length of the longest unreleased tail that is a proper prefix of a stop string."""
        tail = self._text[self._sent :]
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best
