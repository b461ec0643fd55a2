"""The one prompt builder shared by serving, bank building, fine-tuning and evaluation.

MTA prompts carry the user's BM25 top-1 history item before the instruction:

    ### User History:
    <rendered item>

    ### User Instruction:
    <instruction>

Serving cuts the item to a token budget (`truncate_tokens`, MTA_MAX_HISTORY_TOKENS and the room
the context leaves), so that a long profile item never makes a request too long.
"""

from __future__ import annotations

import re
import string
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from rank_bm25 import BM25Okapi

_TOKEN = re.compile(r"\w+", re.UNICODE)


def render_item(item: Mapping[str, Any], template: str | None = None) -> str:
    """One history item as text: the task template when the item has its fields, else `key: value` pairs."""
    if template:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        if fields and fields <= item.keys():
            return template.format(**{k: item[k] for k in fields})
    return " ".join(f"{k}: {v}" for k, v in item.items() if k != "id" and v not in (None, ""))


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class ProfileIndex:
    """A user's rendered history with its BM25 index: built once per profile version, as building
    it costs far more than a query (serving caches it, `server.personalize`).

    Scores are `rank_bm25.BM25Okapi`'s (its idf, lengths and parameters), computed from postings
    (term -> the items that hold it) instead of a pass over every item per query term, so a query
    costs what its terms occur, not the profile's length; the sums are the same, term by term."""

    def __init__(self, history: Sequence[str]) -> None:
        self.history = list(history)
        self.longest = max(map(len, self.history), default=0)  # characters of the longest item
        self._cut: dict[tuple[int, int], str] = {}
        self._bm25 = BM25Okapi([_tokens(h) or [""] for h in self.history]) if len(self.history) > 1 else None
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self._bm25 is not None:
            items: dict[str, tuple[list[int], list[int]]] = {}
            for i, freqs in enumerate(self._bm25.doc_freqs):
                for term, n in freqs.items():
                    rows, counts = items.setdefault(term, ([], []))
                    rows.append(i)
                    counts.append(n)
            self._postings = {t: (np.array(rows), np.array(counts)) for t, (rows, counts) in items.items()}
            self._length_norm = 1 - self._bm25.b + self._bm25.b * np.array(self._bm25.doc_len) / self._bm25.avgdl

    def scores(self, query: str) -> np.ndarray:
        """`BM25Okapi.get_scores` of the query's tokens."""
        bm25 = self._bm25
        assert bm25 is not None
        score = np.zeros(bm25.corpus_size)
        for term in _tokens(query):
            if (posting := self._postings.get(term)) is None:
                continue  # in no item: BM25Okapi adds zeros
            rows, freq = posting
            score[rows] += (bm25.idf.get(term) or 0) * (freq * (bm25.k1 + 1) / (freq + bm25.k1 * self._length_norm[rows]))
        return score

    def top1_index(self, query: str) -> int | None:
        """Which history item is most relevant to the query by BM25 (first one on ties), or None."""
        if self._bm25 is None:
            return 0 if self.history else None
        return int(self.scores(query).argmax())

    def top1(self, query: str) -> str | None:
        """The history text most relevant to the query by BM25 (first one on ties), or None."""
        i = self.top1_index(query)
        return None if i is None else self.history[i]

    def cut(self, i: int, tokenizer: Any, max_tokens: int) -> str:
        """`truncate_tokens` of item i, remembered: a returning user's requests retrieve the same
        few items, and tokenizing one costs more than the rest of a warm request's server-side
        work. One index serves one tokenizer (the server's)."""
        key = (i, max_tokens)
        if (text := self._cut.get(key)) is None:
            text = self._cut[key] = truncate_tokens(tokenizer, self.history[i], max_tokens)
        return text


def retrieve_top1(history: Sequence[str], query: str) -> str | None:
    """The history text most relevant to the query by BM25 (first one on ties), or None."""
    return ProfileIndex(history).top1(query)


HISTORY_HEAD = "### User History:\n"
INSTRUCTION_HEAD = "\n\n### User Instruction:\n"


def user_content(instruction: str, history_item: str | None) -> str:
    """The user turn of an MTA prompt."""
    if history_item is None:
        return instruction
    return f"{HISTORY_HEAD}{history_item}{INSTRUCTION_HEAD}{instruction}"


def last_user_turn(messages: Sequence[Mapping[str, str]]) -> int | None:
    """Index of the last user message (the instruction a history item is retrieved for), or None."""
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)


def with_history_item(messages: list[dict[str, str]], history_item: str | None) -> list[dict[str, str]]:
    """The conversation with `history_item` put into its last user turn (unchanged if None)."""
    last_user = last_user_turn(messages)
    if last_user is None or history_item is None:
        return messages
    out = [dict(m) for m in messages]
    out[last_user]["content"] = user_content(out[last_user]["content"], history_item)
    return out


def count_tokens(tokenizer: Any, text: str) -> int:
    # verbose=False: a text longer than the model's context is expected here, not worth a warning.
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def truncate_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of `text`, cut at a token boundary, that is at most `max_tokens` tokens."""
    if max_tokens <= 0:
        return ""
    try:  # fast tokenizers: cut the original text at the token's end (no decode round trip)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError):
        enc, offsets = tokenizer(text, add_special_tokens=False, verbose=False), None
    ids = enc["input_ids"]
    if len(ids) <= max_tokens:
        return text
    # A character split over two byte-level tokens may re-encode one token longer: cut earlier then.
    for keep in range(max_tokens, 0, -1):
        prefix = text[: offsets[keep - 1][1]] if offsets is not None else tokenizer.decode(ids[:keep])
        if count_tokens(tokenizer, prefix) <= max_tokens:
            return prefix
    return ""


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation in the model's chat template, ending with the assistant turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@dataclass(frozen=True)
class _Frame:
    """The chat template around a lone user turn: rendered text = prefix + content + suffix."""

    head_ids: list[int]  # tokens of prefix + HISTORY_HEAD: every spliced prompt starts with them
    suffix: str
    trims: bool  # the template strips the content's surrounding whitespace
    probe_tail_ids: list[int]  # tokens of INSTRUCTION_HEAD + PromptSplicer.PROBE + suffix, for checking items


class PromptSplicer:
    """`chat_prompt` of a one-turn MTA prompt, without tokenizing its history item each time.

    Tokenizing is most of a returning user's server-side work (SmolLM2's byte-level
    pre-tokenizer: about 1 us per token, and the item is half the prompt). The prompt's tokens
    are cut into [template prefix + HISTORY_HEAD] [item] [INSTRUCTION_HEAD + instruction +
    template suffix]: the first piece is tokenized once, each item once (kept in an LRU), only
    the last per request. That is exact only where the tokenizer splits at the item's two ends,
    which depends on the tokenizer and on the item's first and last characters: each item is
    checked once against tokenizing its whole prompt, and an item that fails (or a template
    that does not insert the content verbatim) gets the whole prompt tokenized, as before.
    Not thread-safe: the caller holds the tokenizer's lock.
    """

    PROBE = "Answer."  # the instruction of the one-off check of an item: its piece is tokenized whole anyway

    def __init__(self, tokenizer: Any, max_items: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.max_items = max_items
        self._items: OrderedDict[str, list[int] | None] = OrderedDict()

    def ids(self, instruction: str, item: str) -> list[int] | None:
        """The token ids of `chat_prompt(tokenizer, [user turn of user_content(instruction, item)])`, or None."""
        frame = self.frame
        if frame is None or (frame.trims and (not instruction or instruction[-1].isspace())):  # the content's end
            return None
        if (item_ids := self._item_ids(frame, item)) is None:
            return None
        return [*frame.head_ids, *item_ids, *self._encode(INSTRUCTION_HEAD + instruction + frame.suffix)]

    @cached_property
    def frame(self) -> _Frame | None:
        """None: the template cannot be spliced."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        render = lambda content: self.tokenizer.apply_chat_template(  # noqa: E731
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        sentinel = "MTA-CONTENT-7f3a"
        rendered = render(sentinel)
        if not isinstance(rendered, str) or rendered.count(sentinel) != 1:
            return None
        prefix, suffix = rendered.split(sentinel)
        probe = " \n### A probe: {x}, 1 2\n "
        trims = render(probe) != prefix + probe + suffix
        if trims and render(probe.strip()) != prefix + probe.strip() + suffix:
            return None  # the template changes the content in some other way
        return _Frame(self._encode(prefix + HISTORY_HEAD), suffix, trims, self._encode(INSTRUCTION_HEAD + self.PROBE + suffix))

    def _item_ids(self, frame: _Frame, item: str) -> list[int] | None:
        if item in self._items:
            self._items.move_to_end(item)
            return self._items[item]
        ids: list[int] | None = self._encode(item)
        whole = chat_prompt(self.tokenizer, [{"role": "user", "content": user_content(self.PROBE, item)}])
        if whole != [*frame.head_ids, *ids, *frame.probe_tail_ids]:
            ids = None
        self._items[item] = ids
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return ids

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
