"""The data of ``--method grpo`` and ``--method dpo``: prompts with their rewards, preference pairs.

- GRPO: the prompts of the role's (prepared) training records, each with the ``RewardSpec`` its role
  declares (``AgentRole.rewards``); records the role does not reward (text steps) are counted and
  left out. ``reward_functions`` turns the specs into TRL reward functions, one per reward part
  (TRL logs each as ``rewards/<part>/mean``).
- DPO: a JSONL of preference pairs in TRL's format, one ``{"prompt", "chosen", "rejected"}`` per line
  (each a string, or chat turns); every line is kept or written to a rejects file with its reason.

Light: datasets / trl are imported by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from comapoi_cli.data.prepare import PreparedData
from comapoi_cli.fileio import iter_jsonl, sha256_file, write_jsonl
from comapoi_cli.rewards import RewardSpec, reward_function_name
from comapoi_cli.roles import AgentRole, RoleContext
from comapoi_cli.training.errors import TrainingDataError


@dataclass
class RewardPrompts:
    """GRPO's training set: prompts (chat turns before the answer), the spec of each, what was left out."""

    prompts: list[list[dict[str, str]]]
    specs: list[RewardSpec]
    text_steps: int = 0  #: records of a text step (profile, pattern): not trained with rewards
    too_long: int = 0  #: prompts longer than --seq-length minus --max-completion-length
    longest_prompt: int = 0
    prompt_tokens: list[int] = field(default_factory=list)

    def part_names(self) -> list[str]:
        """Every reward part's name, in the order first declared."""
        names: list[str] = []
        for spec in self.specs:
            for part in spec.parts:
                if part.name not in names:
                    names.append(part.name)
        return names

    def describe(self) -> dict[str, Any]:
        return {"prompts": len(self.prompts), "text_steps_left_out": self.text_steps, "too_long_left_out": self.too_long,
                "longest_prompt_tokens": self.longest_prompt,
                "prompt_tokens": sum(self.prompt_tokens), "reward_parts": self.part_names(),
                "steps": sorted({spec.step for spec in self.specs})}


def _prompt_turns(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The turns before the record's last answer: what the model is asked at inference."""
    last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=len(messages))
    return [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in messages[:last]]


def reward_prompts(path: Path, role: AgentRole, context: RoleContext, tokenizer: Any, *, limit: int,
                   max_prompt_tokens: int) -> RewardPrompts:
    """Read the prepared training file of ``role`` into GRPO prompts with their reward specs."""
    out = RewardPrompts([], [])
    for number, _raw, record, error in iter_jsonl(path):
        if error is not None:  # a prepared file: every line is a cleaned chat record
            raise TrainingDataError(f"{path} line {number} is not a chat record; prepare the data with comapoi data clean.")
        spec = role.rewards(record, context)
        if spec is None:
            out.text_steps += 1
            continue
        prompt = _prompt_turns(record.get("messages") or [])
        tokens = len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        out.longest_prompt = max(out.longest_prompt, tokens)
        if tokens > max_prompt_tokens:
            out.too_long += 1
            continue
        out.prompts.append(prompt)
        out.specs.append(spec)
        out.prompt_tokens.append(tokens)
        if limit and len(out.prompts) >= limit:
            break
    return out


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or chat turns (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(turn.get("content", "")) for turn in completion if isinstance(turn, dict))
    return str(completion)


def reward_functions(specs: list[RewardSpec], names: list[str]) -> tuple[list[Callable[..., list[float | None]]], list[float]]:
    """One TRL reward function per part name, and their weights.

    Each function scores the completions of the prompts it is given (the ``spec_index`` column says
    whose spec); a prompt whose spec lacks the part scores None (TRL leaves it out of that part).
    """
    functions: list[Callable[..., list[float | None]]] = []
    weights: list[float] = []
    for name in names:
        weight = next(part.weight for spec in specs for part in spec.parts if part.name == name)

        def score(prompts: Any, completions: list[Any], spec_index: list[int], _name: str = name,
                  **_: Any) -> list[float | None]:
            out: list[float | None] = []
            for completion, index in zip(completions, spec_index):
                part = next((p for p in specs[int(index)].parts if p.name == _name), None)
                out.append(None if part is None else float(part.score(completion_text(completion))))
            return out

        score.__name__ = score.__qualname__ = reward_function_name(name)
        functions.append(score)
        weights.append(weight)
    return functions, weights


# -- DPO: preference pairs -------------------------------------------------------------------------------
PAIR_KEYS = ("prompt", "chosen", "rejected")


def _turns(value: Any, default_role: str, what: str) -> list[dict[str, str]]:
    """A pair field as chat turns: a non-empty string becomes one turn of ``default_role``."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{what} is empty")
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and value:
        turns = []
        for turn in value:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
                raise ValueError(f"{what} is not a list of {{role, content}} turns")
            turns.append({"role": turn["role"], "content": turn["content"]})
        return turns
    raise ValueError(f"{what} is neither text nor a list of chat turns")


def check_pair(record: Any) -> tuple[dict[str, list[dict[str, str]]] | None, str | None]:
    """``(pair as chat turns, None)`` for a usable pair line, else ``(None, reason)``."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    missing = [key for key in PAIR_KEYS if key not in record]
    if missing:
        return None, f"no {', '.join(missing)} (a pair has prompt, chosen and rejected)"
    try:
        pair = {"prompt": _turns(record["prompt"], "user", "prompt"),
                "chosen": _turns(record["chosen"], "assistant", "chosen"),
                "rejected": _turns(record["rejected"], "assistant", "rejected")}
    except ValueError as exc:
        return None, str(exc)
    if pair["chosen"] == pair["rejected"]:
        return None, "chosen and rejected are the same answer"
    return pair, None


@dataclass
class PreferencePairs:
    pairs: list[dict[str, list[dict[str, str]]]]
    too_long: int = 0
    longest: int = 0

    def prompt_keys(self) -> list[str]:
        """The conversation keys of the pairs' prompts (``data_keys.json``: what eval must not score as held out)."""
        from comapoi_cli.runs.datakeys import prompt_key

        return [prompt_key(pair["prompt"]) for pair in self.pairs]


def prepare_pairs(path: Path) -> PreparedData:
    """Check a pair file line by line; write the rejected lines with their reasons beside it (or say so).

    Returns the data as ``PreparedData`` (train_path is the pair file itself, nothing held out); the
    rejects go to ``{stem}.pairs.rejects.jsonl`` beside it, or to the comapoi cache when that folder is
    read-only.
    """
    if not path.is_file():
        raise TrainingDataError(f"Preference pair file {path} does not exist.")
    kept, rejects, total = 0, [], 0
    for number, raw, record, error in iter_jsonl(path, errors="replace"):
        total += 1
        if error is not None:
            rejects.append({"line": number, "reason": f"not JSON ({str(error).split(':')[0]})",
                            "text": raw.decode("utf-8", "replace").rstrip("\r\n")[:2000]})
            continue
        pair, reason = check_pair(record)
        if pair is None:
            rejects.append({"line": number, "reason": reason, "record": record})
        else:
            kept += 1
    summary: dict[str, Any] = {"in": total, "kept": kept, "rejected": len(rejects), "train": kept, "holdout": 0}
    if rejects:
        from comapoi_cli.data.prepare import _cache_dir_for, _writable_dir

        folder = path.parent if _writable_dir(path.parent) else _cache_dir_for(path)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{path.stem}.pairs.rejects.jsonl"
        write_jsonl(target, rejects)
        summary["rejects_files"] = [str(target)]
    if not kept:
        raise TrainingDataError(f"{path} holds no usable preference pair ({len(rejects)} lines rejected"
                                + (f", reasons in {summary['rejects_files'][0]}" if rejects else "") + ").",
                                hint='Each line: {"prompt": ..., "chosen": ..., "rejected": ...} (text or chat turns).')
    return PreparedData(train_path=path, holdout_path=None, input_hashes={str(path): sha256_file(path)}, summary=summary)


def read_pairs(path: Path, tokenizer: Any, *, limit: int, max_tokens: int) -> PreferencePairs:
    """The usable pairs of a checked pair file, without those longer than ``max_tokens`` (prompt + answer)."""
    out = PreferencePairs([])
    for _number, _raw, record, error in iter_jsonl(path, errors="replace"):
        pair = None if error is not None else check_pair(record)[0]
        if pair is None:
            continue
        longest = max(len(tokenizer.apply_chat_template(pair["prompt"] + pair[key], tokenize=True, return_dict=True)["input_ids"])
                      for key in ("chosen", "rejected"))
        out.longest = max(out.longest, longest)
        if longest > max_tokens:
            out.too_long += 1
            continue
        out.pairs.append(pair)
        if limit and len(out.pairs) >= limit:
            break
    return out


__all__ = ["PreferencePairs", "RewardPrompts", "check_pair", "completion_text", "prepare_pairs", "read_pairs",
           "reward_functions", "reward_prompts"]
