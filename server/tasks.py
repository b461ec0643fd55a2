"""The tasks this project knows, in one place: how a history item renders, the instruction and
answer it becomes, and how `mta eval` scores the task.

The bank builder reads the templates (`Task`, `make_task`), the evaluation the scoring
(`scoring`: metric kind, label set, generation length), and a bank's manifest names its task.
Any other task is given by its templates (`make_task`) and scored as generation.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from server.prompts import render_item

MetricKind = Literal["classification", "generation", "rating"]


class TaskError(ValueError):
    """A task's templates do not fit together, or an unknown task without templates."""


LAMP2M_TAGS = (
    "sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, "
    "fantasy, romance, thought-provoking, social commentary, violence, true story"
)


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


@dataclass(frozen=True)
class Task:
    """How a history item becomes text (embedding, BM25 context) and a training example.

    `history_template` renders an item (it is what the server renders, via the manifest's
    task); `prompt_template` is the instruction for a left-out item, in the style of the
    task's queries; `answer_field` is the item field the model must produce.
    """

    name: str
    history_template: str
    prompt_template: str
    answer_field: str

    def __post_init__(self) -> None:
        problems = []
        if not _fields(self.history_template):
            problems.append(f"history template {self.history_template!r} names no {{field}}")
        if not _fields(self.prompt_template):
            problems.append(f"prompt template {self.prompt_template!r} names no {{field}}")
        if self.answer_field in _fields(self.prompt_template):
            problems.append(f"the prompt template shows the answer field {{{self.answer_field}}}")
        if problems:
            raise TaskError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def item_fields(self) -> list[str]:
        """Fields every profile item needs."""
        return sorted({*_fields(self.history_template), *_fields(self.prompt_template), self.answer_field})

    def render(self, item: Mapping[str, Any]) -> str:
        return render_item(item, self.history_template)

    def instruction(self, item: Mapping[str, Any]) -> str:
        return self.prompt_template.format(**{k: item[k] for k in _fields(self.prompt_template)})

    def answer(self, item: Mapping[str, Any]) -> str:
        return str(item[self.answer_field])


TASKS: dict[str, Task] = {
    # LaMP-2M: the instruction is LaMP's query input for the item ("... tags: [...] description: ...").
    "movie_tagging": Task(
        name="movie_tagging",
        history_template="Description: {description} Tag: {tag}",
        prompt_template=(
            "Which tag does this movie relate to among the following tags? Just answer with the tag name "
            f"without further explanation. tags: [{LAMP2M_TAGS}] description: {{description}}"
        ),
        answer_field="tag",
    ),
    # LaMP-4: "Generate a headline for the following article: <text>".
    "news_headline": Task(
        name="news_headline",
        history_template="Article: {text} Headline: {title}",
        prompt_template="Generate a headline for the following article: {text}",
        answer_field="title",
    ),
}


def make_task(
    name: str,
    history_template: str | None = None,
    prompt_template: str | None = None,
    answer_field: str | None = None,
) -> Task:
    """A known task (templates may be overridden) or a generic one given by its templates.

    A generic task's answer field defaults to the one field of the history template that
    the prompt template does not show.
    """
    known = TASKS.get(name)
    history_template = history_template or (known.history_template if known else None)
    prompt_template = prompt_template or (known.prompt_template if known else None)
    if not history_template or not prompt_template:
        raise TaskError(
            f"task {name!r} is not one of {sorted(TASKS)}: give --history-template and --prompt-template"
        )
    if answer_field is None:
        if known and known.answer_field in _fields(history_template):
            answer_field = known.answer_field
        else:
            candidates = sorted(set(_fields(history_template)) - set(_fields(prompt_template)))
            if len(candidates) != 1:
                raise TaskError(
                    f"cannot tell the answer field of task {name!r} from the templates (history-only fields: "
                    f"{candidates}): give --answer-field"
                )
            answer_field = candidates[0]
    return Task(name, history_template, prompt_template, answer_field)


@dataclass(frozen=True)
class Scoring:
    """How `mta eval` scores a task (LaMP's metrics; the paper's generation lengths)."""

    metric: MetricKind
    labels: tuple[str, ...] = ()  # the closed label set of a classification task
    max_new_tokens: int = 32


SCORING: dict[str, Scoring] = {
    "movie_tagging": Scoring("classification", tuple(t.strip() for t in LAMP2M_TAGS.split(",")), max_new_tokens=10),
    "news_headline": Scoring("generation", max_new_tokens=50),
}


def scoring(task_name: str) -> Scoring:
    """A known task's scoring; any other task is scored as generation."""
    return SCORING.get(task_name, Scoring("generation"))
