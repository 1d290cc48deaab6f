"""Whether a prompt gives its label away: the generic ``label_leak`` check.

Core (no service imports): ``AgentRole.check_leak`` (``comapoi_cli/roles.py``) and the record checks
of ``data clean`` / ``data stats`` (``comapoi_cli/data/records.py``) both use it.
"""

from __future__ import annotations

import re

# A prompt that states the label: an explicit "True Next POI Information" section (the original
# inverse prompts), or a value given for the next POI id ("next POI ID is 22", "next_poi_id": 22).
# Found by str.find on "next" (fast on long prompts), then small regexes on the text around it.
_LEAK_BEFORE = re.compile(r"(?:true|actual|real|correct|ground[\s_-]*truth|target)[\s_-]*$")
_LEAK_AFTER = re.compile(
    r"next[\s_-]*poi(?:[\s_-]*(?:ids?|information|info))?[\"']?\s*(?:is|was|will\s+be|[:=])\s*[\[\"'{(]*\s*(?:poi[\s_-]*id[\"']?\s*[:=]?\s*)?(\d+)")


# "next POI" in its usual spellings: found by str.find on the literals "ext" / "EXT" (memchr
# speed; a regex scan for the same literal is ~10x slower on long prompts), then this regex right
# after the literal. Together: the pattern ``[nN](?:ext|EXT)[\s_-]*(?:poi|POI|Poi)``.
_POI_AFTER_EXT = re.compile(r"[\s_-]*(?:poi|POI|Poi)")


def find_label_leak(prompt: str) -> str | None:
    """Why ``prompt`` (the system and user turns) gives the answer away, or None.

    Flags an explicit "True Next POI Information" section (or "actual/ground-truth next POI")
    and a stated next-POI value such as ``next POI ID is 22`` or ``"next_poi_id": 22``.
    Placeholders such as ``{"next_poi_id": ["value", ...]}`` in output-format instructions are
    not leaks.
    """
    find = prompt.find
    after_ext = _POI_AFTER_EXT.match
    for literal in ("ext", "EXT"):
        position = find(literal)
        while position >= 0:
            index = position - 1
            if index >= 0 and prompt[index] in "nN" and after_ext(prompt, position + 3):
                after = prompt[index: index + 80].lower()
                before = prompt[max(0, index - 24): index].lower()
                marker = _LEAK_BEFORE.search(before)
                if marker:
                    return f"the prompt contains '{prompt[index - len(marker.group(0)): index + 8].strip()}'"
                value = _LEAK_AFTER.match(after)
                if value:
                    return f"the prompt states the next POI id ({prompt[index: index + value.end()].strip()})"
            position = find(literal, position + 3)  # "ext" cannot overlap itself
    return None


def find_leak_in_messages(messages: list[dict[str, str]]) -> str | None:
    """:func:`find_label_leak` over each system and user turn (no joined copy of the prompt)."""
    for message in messages:
        if message["role"] != "assistant":
            found = find_label_leak(message["content"])
            if found:
                return found
    return None
