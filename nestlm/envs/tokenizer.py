"""A compact word/symbol tokenizer for the agent trajectory DSL (and plain lowercase text).

Text is split on whitespace into words. A word that is in the vocabulary (a tag such as `[O]`, a
keyword such as `swap`) is one token. Any other word is cut into pieces, left to right:

    digits               one token per digit                    "482"  -> 4 ##8 ##2
    consonant+vowel      one syllable token ("ke", "va", ...)    "keva" -> ke ##va
    other letters        one token per letter                   "xyz"  -> x ##y ##z
    punctuation          one token per character                "ok."  -> ok ##.

The first piece of a word has no prefix, later pieces carry `##` (WordPiece style), so decoding
restores the word boundaries. Entity names in the environments are compositions of syllables, so a
held-out name is an unseen combination of seen tokens, never an unseen token.

`decode(encode(text))` returns `text` with whitespace normalised: words joined by one space and a
newline after every `[E]` and `[/P]` (the DSL's canonical form, which the environments emit).
"""

from __future__ import annotations

import string
from collections.abc import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
TAGS = ("[P]", "[/P]", "[O]", "[T]", "[A]", "[Q]", "[E]")
KEYWORDS = (
    # shared
    "ok",
    "no",
    "news",
    "idle",
    "where",
    "at",
    "of",
    "is",
    "?",
    # ledger
    "ledger",
    "dep",
    "wd",
    "bal",
    "code",
    "set",
    "frozen",
    "acct",
    # shell
    "shell",
    "swap",
    "cyc",
    "rot",
    "peek",
    "reveal",
    "cup",
    # courier
    "courier",
    "map",
    "item",
    "go",
    "take",
    "drop",
    "wait",
    "order",
    "to",
    "done",
    "moved",
)
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in CONSONANTS for v in VOWELS)
LETTERS = tuple(string.ascii_lowercase)
DIGITS = tuple(string.digits)
PUNCT = tuple(".,;:!?'\"-()/+=*%&<>[]_#@$")


def _build_vocab() -> list[str]:
    vocab: list[str] = []
    seen: set[str] = set()

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)

    for tok in SPECIALS + TAGS + KEYWORDS:
        add(tok)
    for group in (DIGITS, SYLLABLES, LETTERS, PUNCT):
        for tok in group:
            add(tok)
            add("##" + tok)
    return vocab


class Tokenizer:
    """Deterministic tokenizer with a fixed vocabulary (`vocab_size` <= 512).

    encode(str) -> list[int]; decode(list[int]) -> str. Word-level tokens first, then
    digit / syllable / letter / punctuation pieces for anything else; characters outside that set
    become `<unk>`.
    """

    def __init__(self) -> None:
        self.vocab: list[str] = _build_vocab()
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.stoi[t] for t in SPECIALS)
        self._syll = set(SYLLABLES)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_to_id(self, tok: str) -> int:
        if tok not in self.stoi:
            raise ValueError(f"token {tok!r} is not in the nestlm eval vocabulary")
        return self.stoi[tok]

    def _pieces(self, word: str) -> list[str]:
        if word in self.stoi:
            return [word]
        out: list[str] = []
        i = 0
        while i < len(word):
            ch = word[i]
            if i + 1 < len(word) and word[i : i + 2] in self._syll:
                piece, i = word[i : i + 2], i + 2
            elif ch in self.stoi:
                piece, i = ch, i + 1
            else:
                out.append(UNK)
                i += 1
                continue
            out.append(piece if not out else "##" + piece)
        return out

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`; `bos=True` prepends `<bos>`. Words outside the vocabulary are
        lowercased before they are cut into pieces (the vocabulary has no capitals)."""
        ids = [self.bos_id] if bos else []
        for word in text.split():
            pieces = [word] if word in self.stoi else self._pieces(word.lower())
            ids.extend(self.stoi[p] for p in pieces)
        return ids

    def tokens(self, text: str) -> list[str]:
        return [self.vocab[i] for i in self.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens other than `<unk>` are dropped."""
        words: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the vocabulary [0, {len(self.vocab)})")
            tok = self.vocab[i]
            if tok in (PAD, BOS, EOS):
                continue
            if tok.startswith("##") and len(tok) > 2 and words:
                words[-1] += tok[2:]
            else:
                words.append(tok[2:] if tok.startswith("##") and len(tok) > 2 else tok)
        out = []
        for w in words:
            out.append(w)
            out.append("\n" if w in ("[E]", "[/P]") else " ")
        return "".join(out).rstrip(" ")


_DEFAULT: Tokenizer | None = None


def get_tokenizer() -> Tokenizer:
    """The shared tokenizer instance (the vocabulary is fixed, so one is enough)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Tokenizer()
    return _DEFAULT
