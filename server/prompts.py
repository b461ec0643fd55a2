"""The one prompt builder shared by serving, bank building, fine-tuning and evaluation.

MTA prompts carry the user's BM25 top-1 history item before the instruction:

    ### User History:
    <rendered item>

    ### User Instruction:
    <instruction>
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

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


def retrieve_top1(history: Sequence[str], query: str) -> str | None:
    """The history text most relevant to the query by BM25 (first one on ties), or None."""
    if not history:
        return None
    if len(history) == 1:
        return history[0]
    scores = BM25Okapi([_tokens(h) or [""] for h in history]).get_scores(_tokens(query))
    return history[int(scores.argmax())]


def user_content(instruction: str, history_item: str | None) -> str:
    """The user turn of an MTA prompt."""
    if history_item is None:
        return instruction
    return f"### User History:\n{history_item}\n\n### User Instruction:\n{instruction}"


def personalize_messages(
    messages: list[dict[str, str]], history: Sequence[str]
) -> list[dict[str, str]]:
    """Put the BM25 top-1 history item (retrieved with the last user turn) into that turn."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None or not history:
        return messages
    out = [dict(m) for m in messages]
    instruction = out[last_user]["content"]
    out[last_user]["content"] = user_content(instruction, retrieve_top1(history, instruction))
    return out


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation in the model's chat template, ending with the assistant turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
