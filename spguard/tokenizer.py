"""An offline CLIP tokenizer whose vocabulary is built in code (no hub download).

Every given word becomes a single token; any other text still tokenizes, byte by byte, through
CLIP's byte-level alphabet, exactly as a real CLIP tokenizer would treat unknown words.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPTokenizer

END_OF_WORD = "</w>"  # CLIP's BPE marks the last symbol of a word with this suffix.


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best = min((r, i) for r, i in pairs if r is not None) if any(r is not None for r, _ in pairs) else None
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def offline_clip_tokenizer(words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer where each of `words` (lower-case ASCII) is one token."""
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + END_OF_WORD: len(alphabet) + i for i, c in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    words = sorted({w.lower() for w in words if len(w) > 1})
    # Merges learned for one word can fire inside another; add joins until every word is one token.
    changed = True
    while changed:
        changed = False
        for word in words:
            parts = _segment(word, ranks)
            while len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                parts = [pair[0] + pair[1]] + parts[2:]
                changed = True
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = model_max_length
    return tokenizer
