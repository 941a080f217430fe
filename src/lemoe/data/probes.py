"""Fixed probe material shared by every method: same-subject templates and the control text.

``same_subject`` probes ask other facts about the edited subject; an edit should leave them alone.
They come from one fixed, ordered set of relation templates (:data:`SAME_SUBJECT_TEMPLATES`). The
edited relation itself must not be among them, so a template is dropped when any of its relation's
keywords occurs (as a plain substring) in the lower-cased edit prompt or any of its paraphrases.
Matching is deliberately broad: dropping a template that was unrelated costs one probe, keeping
the edited relation would score the edit itself as a side effect. Of the templates that survive,
the first :data:`MAX_SAME_SUBJECT` in the fixed order are kept, so every request gets a few and the
choice is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

# (relation name, template with {} for the subject, keywords identifying that relation in a prompt)
SAME_SUBJECT_TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("birthplace", "{} was born in", ("born", "birth", "native of", "hometown")),
    (
        "field of work",
        "{} works in the field of",
        ("field", "area of work", "works in", "work in", "domain", "specializ", "specialis", "discipline"),
    ),
    ("citizenship", "{} is a citizen of", ("citizen", "nationality", "passport", "national of")),
    (
        "native language",
        "The mother tongue of {} is",
        ("mother tongue", "native language", "language", "speak", "spoke", "tongue"),
    ),
    (
        "location",
        "{} is located in",
        (
            "located",
            "location",
            "in the country",
            "continent",
            "headquarter",
            "capital",
            "situated",
            "based in",
            "which country",
            "what country",
            "where is",
        ),
    ),
    ("employer", "{} works for", ("works for", "work for", "worked for", "employ", "hired")),
    ("religion", "The official religion of {} is", ("religion", "religious", "faith", "worship")),
    (
        "owner/maker",
        "{} is owned by",
        (
            "owned",
            "owner",
            "made by",
            "maker",
            "manufactur",
            "produced by",
            "producer",
            "developed by",
            "developer",
            "created by",
            "product",
        ),
    ),
    ("sport", "{} plays the sport of", ("sport", "play", "team", "league", "position")),
    ("genre", "The genre of {} is", ("genre", "music", "style of", "plays")),
)

MAX_SAME_SUBJECT = 4


def same_subject_prompts(
    subject: str | None, prompts: Iterable[str], *, limit: int = MAX_SAME_SUBJECT
) -> tuple[str, ...]:
    """Prompts about other relations of ``subject``, minus those of the relation in ``prompts``.

    ``prompts`` are the edit prompt and its paraphrases. No subject gives no probes.
    """
    if not subject:
        return ()
    text = " ".join(p.lower() for p in prompts)
    kept = [t.format(subject) for _name, t, keywords in SAME_SUBJECT_TEMPLATES if not any(k in text for k in keywords)]
    return tuple(kept[:limit])


CONTROL_TEXT_FILE = "control_text.txt"


def control_text() -> str:
    """The packaged control text whose perplexity tracks general fluency across edits."""
    return (resources.files("lemoe.data") / "samples" / CONTROL_TEXT_FILE).read_text(encoding="utf-8").strip()
