"""run.json in one place: ``RunInfo`` exposes every section, and nothing outside ``comapoi_cli/runs/`` parses it.

The first tests read a real finished tiny run (the session's ``trained_run``, made by the real CLI)
and check that every top-level key its run.json holds is a property of ``RunInfo`` with the
recorded value, that an old run.json without most sections still loads, and that ``adapters list``
shows what the properties say. The last ones read the source of ``comapoi_cli/`` (``ast``) and fail
when a module outside ``runs/`` reads run.json itself, digs into ``RunInfo.run`` or re-types a run
folder's file name; a planted copy of each violation proves the check can fail.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

from support import run_comapoi

from comapoi_cli.runs.info import RunInfo, locate_run, previous_run, read_run
from comapoi_cli.runs.layout import ADAPTER_WEIGHTS, DATA_KEYS, RUN_JSON

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "comapoi_cli"

#: run.json keys whose property has another name (the rest are named as the key).
ACCESSORS = {"base_model": "base_model_info", "run_dir": "recorded_run_dir", "checkpoints": "recorded_checkpoints"}
#: The sections the issue names; a real finished run records each of them.
REQUIRED = ("job", "progress", "lora", "base_model", "backend", "evaluations", "data", "device", "fit", "segments")


def _empty(value):
    return value in (None, {}, [], "")


def test_runinfo_exposes_every_section_of_a_real_run(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run_dir)
    # an evaluation as comapoi eval appends it, the latest (the shared fixture's run may already hold evaluations of earlier tests)
    from comapoi_cli.runs.record import append_evaluation

    append_evaluation(run_dir / RUN_JSON, {"time": "9999-12-31T23:59:59", "metrics": {"acc@1": 0.5}})
    raw = json.loads((run_dir / RUN_JSON).read_text())
    info = locate_run(run_dir)
    assert info.recorded and info.run_json == run_dir / RUN_JSON and not info.is_checkpoint
    for key in REQUIRED:
        assert key in raw, key
    missing = [key for key in raw if not hasattr(RunInfo, ACCESSORS.get(key, key))]
    assert not missing, f"run.json sections without a RunInfo property: {missing}"
    for key, value in raw.items():
        got = getattr(info, ACCESSORS.get(key, key))
        if _empty(value):
            assert _empty(got), (key, got)
        else:
            assert got == value, (key, got, value)
    # the values read from the sections
    assert info.global_step == raw["progress"]["global_step"] == 8
    assert info.max_steps == 8 and info.final_loss == raw["progress"]["final_loss"]
    assert info.backend_name == "trl" and info.method == "sft" and info.type == "merged" and info.dataset == "nyc"
    assert info.base_model == raw["base_model"]["path"] and info.base_model_kind == "tiny"
    assert info.base_model_corpus and all(path.is_file() for path, _ in info.base_model_corpus)
    assert info.lora["r"] == raw["job"]["lora_r"]
    assert info.train_file == (Path(raw["data"]["train_file"]), raw["data"]["train_sha256"])
    assert info.holdout == Path(raw["data"]["holdout_file"]) and info.holdout_sha256 == raw["data"]["holdout_sha256"]
    assert info.data_keys == run_dir / DATA_KEYS and info.data_keys.is_file()
    assert info.adapter_weights == run_dir / ADAPTER_WEIGHTS and info.adapter_weights.is_file()
    assert info.latest_evaluation == {"time": "9999-12-31T23:59:59", "metrics": {"acc@1": 0.5}}
    assert info.last_metrics == {"acc@1": 0.5}
    assert info.recorded_checkpoints == ["checkpoint-4", "checkpoint-8"]


def test_old_and_broken_run_json_still_load(trained_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained_run.run_dir, old)
    raw = json.loads((old / RUN_JSON).read_text())
    # a run.json from before most sections existed: the job only, backend as a plain name
    (old / RUN_JSON).write_text(json.dumps({"status": "finished", "backend": "trl", "job": raw["job"]}))
    info = locate_run(old)
    assert info.type == "merged" and info.backend_name == "trl" and info.backend == {"name": "trl"}
    assert info.progress == {} and info.lora == {} and info.evaluations == [] and info.chain == []
    assert info.segments == [] and info.global_step is None and info.latest_evaluation is None
    assert info.method == "sft" and info.base_model_corpus is None and info.train_file is None
    assert info.base_model  # from adapter_config.json
    # the lenient reader of listing and --resume
    (old / RUN_JSON).write_text("[1, 2]")
    broken = read_run(old)
    assert broken.not_object and not broken.recorded and previous_run(old) is None
    (old / RUN_JSON).write_text("{not json")
    unreadable = read_run(old)
    assert unreadable.problem and not unreadable.recorded and previous_run(old) is None
    (old / RUN_JSON).unlink()
    absent = read_run(old)
    assert absent.run_json is None and absent.problem is None and not absent.recorded


def test_adapters_list_shows_what_runinfo_reads(trained_run):
    result = run_comapoi("adapters", "list", str(trained_run.output_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout)["runs"]
    info = locate_run(trained_run.run_dir)
    (row,) = [r for r in rows if Path(r["path"]).resolve() == trained_run.run_dir.resolve()]
    assert (row["steps"], row["max_steps"], row["final_loss"]) == (info.global_step, info.max_steps, info.final_loss)
    assert (row["type"], row["backend"], row["lora_r"], row["status"]) == (info.type, info.backend_name, info.lora["r"], info.status)


# -- nothing outside comapoi_cli/runs/ reads run.json itself ------------------------------------------------

#: The run folder's file names: written once, in comapoi_cli/runs/layout.py.
LAYOUT_NAMES = frozenset({"run.json", "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json",
                          "data_keys.json", "trainer_state.json"})
#: Modules that may spell one, each with its reason.
ALLOWED_NAMES = {
    "comapoi_cli/models/resolve.py": "models/ sits below runs/ (it cannot import runs.layout) and only checks that "
                                     "a --model folder is not an adapter",
}
#: Calls that read a file: one that names run.json outside runs/ parses it itself.
READERS = frozenset({"read_json_file", "read_json", "loads", "load", "open", "read_text", "read_bytes", "_read_json"})


def _mentions_run_json(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and n.id == "RUN_JSON") or (isinstance(n, ast.Constant) and n.value == "run.json")
               or (isinstance(n, ast.Attribute) and n.attr == "run_json")
               for n in ast.walk(node))


def run_json_readers(source: str, filename: str) -> list[str]:
    """The places of one module (outside runs/) that read run.json without RunInfo, as ``file:line what``."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in LAYOUT_NAMES \
                and filename not in ALLOWED_NAMES:
            found.append(f"{where} spells the layout name {node.value!r} (use comapoi_cli.runs.layout)")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comapoi_cli.runs"):
            for alias in node.names:
                if alias.name == "read_run_json":
                    found.append(f"{where} imports read_run_json (read the run with read_run / locate_run)")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            arguments = [*node.args, *(k.value for k in node.keywords)]
            if isinstance(func, ast.Attribute) and name in ("read_text", "read_bytes", "open"):
                arguments.append(func.value)
            if name in READERS and any(_mentions_run_json(a) for a in arguments):
                found.append(f"{where} reads run.json itself with {name}() (use comapoi_cli.runs.info.RunInfo)")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute) and func.value.attr == "run" \
                    and name in ("get", "items", "keys", "values", "copy"):
                found.append(f"{where} digs into RunInfo.run with .{name}() (use its properties)")
            if name == "getattr" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "run":
                found.append(f"{where} digs into RunInfo.run with getattr (use its properties)")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "run":
            found.append(f"{where} digs into RunInfo.run[...] (use its properties)")
    return found


def _package_readers(root: Path) -> list[str]:
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent).as_posix()
        if relative.startswith("comapoi_cli/runs/"):
            continue
        found.extend(run_json_readers(path.read_text(encoding="utf-8"), relative))
    return found


def test_no_module_outside_runs_reads_run_json():
    assert _package_readers(PACKAGE) == []


def test_the_check_catches_planted_readers(tmp_path):
    planted = '''
import json
from comapoi_cli.runs.info import read_run_json
from comapoi_cli.runs.layout import RUN_JSON

def status(folder, info):
    data = json.loads((folder / RUN_JSON).read_text())
    weights = folder / "adapter_model.safetensors"
    old = read_run_json(folder)
    return data["status"], info.run["job"], info.run.get("progress"), getattr(info, "run"), open(folder / "run.json")
'''
    found = run_json_readers(planted, "comapoi_cli/evaluation/planted.py")
    text = "\n".join(found)
    for expected in ("imports read_run_json", "reads run.json itself with loads()", "reads run.json itself with read_text()",
                     "'adapter_model.safetensors'", "'run.json'", "RunInfo.run[...]", "RunInfo.run with .get()",
                     "RunInfo.run with getattr", "reads run.json itself with open()"):
        assert expected in text, (expected, found)
    # and in a copy of the package, where it counts
    copy = tmp_path / "comapoi_cli"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "evaluation" / "planted.py").write_text(planted)
    assert any(f.startswith("comapoi_cli/evaluation/planted.py:") for f in _package_readers(copy))
