"""Build a small CLIP tokenizer from a word list, locally (no download).

Used by the ``tiny_random`` test model and by the bundled ``shapes`` model. The result is an ordinary
``transformers.CLIPTokenizer`` (byte-level BPE with ``</w>`` word ends), saved and loaded like any other.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_word_tokenizer(words: list[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary holds every word in ``words`` as one token.

    Other text still tokenizes (letter by letter), so any prompt encodes. Token ids: 0 = BOS, 1 = EOS/pad,
    then single characters, then merge products in a fixed order: the same words give the same ids.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for ch in string.ascii_lowercase + string.digits + ",.-'!?":
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            add(left)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok
