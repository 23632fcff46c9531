"""Build a small CLIP tokenizer from a word list, locally (no download).

Used by the ``tiny_random`` test model and by the bundled ``shapes`` model. The result is an ordinary
``transformers.CLIPTokenizer`` (byte-level BPE with ``</w>`` word ends), saved and loaded like any other.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """The lower-case words of ``text`` (runs of letters; digits and punctuation separate words)."""
    return _WORD.findall(text.lower())


def known_words(tokenizer: Any) -> set[str] | None:
    """The words a :func:`build_word_tokenizer` tokenizer was built from, or None for any other tokenizer
    (a real CLIP vocabulary splits any word into known pieces, so no word is "unknown" to it).

    Recognised by its layout (BOS = 0, EOS = 1, then the single characters from "a"); the words are the
    ``word</w>`` merge products. Single letters are always known (they are in every vocabulary)."""
    vocab = tokenizer.get_vocab()
    if vocab.get(BOS) != 0 or vocab.get(EOS) != 1 or vocab.get("a") != 2:
        return None
    return {t[:-4] for t in vocab if t.endswith("</w>")}


def unknown_words(prompt: str, known: set[str] | None) -> list[str]:
    """Words of ``prompt`` outside ``known`` (in order, once each); [] when ``known`` is None."""
    if known is None:
        return []
    return list(dict.fromkeys(w for w in words(prompt) if w not in known))


def build_word_tokenizer(words: list[str], model_max_length: int = 16, whole_words: bool = False) -> CLIPTokenizer:
    """A CLIP tokenizer with a BPE merge chain for every word in ``words`` (left to right).

    Most words become one token; a word whose chain is pre-empted by an earlier word's higher-ranked merge
    stays a few tokens (e.g. "green" after "red": ``g re e n</w>``) — still deterministic. ``whole_words``
    appends, lowest-ranked, the merges that join such a word's leftover pieces, until every word is one token.
    Other text tokenizes letter by letter, so any prompt encodes. Token ids: 0 = BOS, 1 = EOS/pad, then single
    characters, then merge products in a fixed order: the same words give the same ids. (The bundled shapes
    and ``scenes`` models' tokenizers were built without ``whole_words``; keep that behaviour stable.)
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {BOS: 0, EOS: 1}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for ch in string.ascii_lowercase + string.digits + ",.-'!?":
        add(ch)
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    words = list(dict.fromkeys(w.lower() for w in words))
    for word in words:
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
    while whole_words:  # join the first two leftover pieces of each split word; appended merges rank last
        split = [p for w in words if len(p := tok.tokenize(w)) > 1]
        if not split:
            break
        for pieces in split:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
                add(pieces[0] + pieces[1])
        tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok
