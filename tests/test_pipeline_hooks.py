"""Third-party engines and retrievers: a plugin (a module and a dist-info with a ``comapoi`` entry point
on PYTHONPATH) implements ``register_engines`` and ``register_retrievers``, and ``comapoi pipeline run
--engine NAME --retriever NAME`` chains the agents through them (no model is loaded: the engine answers)."""

from __future__ import annotations

import json

from tests.support import REAL_DATA, run_comapoi
from tests.test_plugins import make_entry_point_plugin

PLUGIN = """
    import json
    from comapoi_cli import hookimpl
    from comapoi_cli.engines import Engine, EngineSession, Generation
    from comapoi_cli.retrievers import Retriever

    class FixedRetriever(Retriever):
        name = "fixed"
        description = "the same three POIs for everyone"

        def prepare(self, index):
            self.max_id = index.max_poi_id

        def retrieve(self, item, k=100):
            return [7, 8, 9][:k]

    class CannedSession(EngineSession):
        description = "canned answers"

        def __init__(self, log):
            self.log = log

        def generate(self, adapter, prompts, max_new_tokens):
            with open(self.log, "a") as handle:
                for messages in prompts:
                    handle.write(json.dumps({"adapter": adapter, "prompt": messages[-1]["content"]}) + "\\n")
            return [Generation('{"next_poi_id": [9, 8, 7]}') for _ in prompts]

    class CannedEngine(Engine):
        name = "canned"
        description = "answers every prompt with the POIs 9, 8, 7"

        def open(self, spec, reporter):
            return CannedSession(LOG)

    LOG = %(log)r

    @hookimpl
    def register_engines(register):
        register(CannedEngine())

    @hookimpl
    def register_retrievers(register):
        register(FixedRetriever())
    """


def test_a_plugin_engine_and_retriever_run_the_chain(trained_run, tmp_path):
    log = tmp_path / "asked.jsonl"
    (tmp_path / "site").mkdir()
    make_entry_point_plugin(tmp_path / "site", "canned_engine", PLUGIN % {"log": str(log)})
    env = {"PYTHONPATH": str(tmp_path / "site")}
    out = tmp_path / "chain"
    result = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(REAL_DATA / "nyc_test.jsonl"),
                         "--merged", str(trained_run.run_dir), "--engine", "canned", "--retriever", "fixed",
                         "--limit", "3", "--output-dir", str(out), "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line["retrieved"] == [7, 8, 9]  # from the plugin's retriever
        assert line["ranking"][:3] == [9, 8, 7]  # from the plugin's engine
    asked = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(asked) == 3 * 5  # per trajectory: agent1 profile + candidates, agent2 pattern + candidates, agent3
    assert any("7" in a["prompt"] and "8" in a["prompt"] and "9" in a["prompt"] for a in asked)  # retrieved POIs reach a prompt

    unknown = run_comapoi("pipeline", "run", "--dataset", "nyc", "--test", str(REAL_DATA / "nyc_test.jsonl"),
                          "--merged", str(trained_run.run_dir), "--engine", "nosuch", "--output-dir",
                          str(tmp_path / "x"), env=env)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "canned" in unknown.stderr  # the plugin's engine is among the choices named
