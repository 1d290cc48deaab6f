"""``comapoi data prepare``: raw check-ins of every format -> CoMaPOI's plain trajectories, through the real CLI.

The real GETNext head of ``../shared/data/raw/`` and small files of each format written here are
prepared; the results are read by ``data synth --source``, ``data stats``, ``train --model tiny`` and
``pipeline run`` without a flag more. Each filter is checked on hand-made rows.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import pytest

from tests.support import REAL_DATA, SHARED, run_comapoi

RAW = SHARED / "data" / "raw"
START = dt.datetime(2012, 4, 3, 18, 0, 9, tzinfo=dt.timezone.utc)
CHECKIN = re.compile(r"At (\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}), ([A-Za-z]+), user (\d+) visit POI ID (\d+) "
                     r"\((.*?), (-?\d+\.?\d*),(-?\d+\.?\d*)\)\.")


@pytest.fixture
def registry_env(tmp_path) -> dict[str, str]:
    """Where prepared cities are recorded (never the user's ~/.config)."""
    return {"COMAPOI_DATASETS_DIR": str(tmp_path / "datasets")}


def prepare(env: dict[str, str], *args: str):
    return run_comapoi("data", "prepare", *args, env=env)


def generated_checkins(users: int = 40, pois: int = 150, per_user: int = 80, seed: int = 1):
    """(user, poi, category, lat, lon, utc) check-ins of a made-up city, every user and POI well visited."""
    rng = random.Random(seed)
    rows = []
    for user in range(users):
        when = START + dt.timedelta(minutes=rng.randint(0, 600))
        for _ in range(per_user):
            poi = rng.randrange(pois)
            when += dt.timedelta(minutes=rng.choice([30, 90, 300, 2000]))
            rows.append((100 + user, poi, ("Café", "Subway", "Ramen /  Noodle House", "Bar, Pub")[poi % 4],
                         34.05 + poi / 1000, -118.25 + poi / 997, when))
    rows.sort(key=lambda r: r[5])
    return rows


def write_tsmc(path: Path, rows, encoding: str = "utf-8") -> Path:
    lines = [f"{u}\tv{p:05d}\tcat{p % 4}\t{c}\t{lat:.8f}\t{lon:.8f}\t-240\t{t:%a %b %d %H:%M:%S +0000 %Y}"
             for u, p, c, lat, lon, t in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def write_gowalla(path: Path, rows) -> Path:
    path.write_text("".join(f"{u}\t{t:%Y-%m-%dT%H:%M:%SZ}\t{lat:.10f}\t{lon:.10f}\t{9000 + p}\n"
                            for u, p, c, lat, lon, t in rows), encoding="utf-8")
    return path


def write_getnext(path: Path, rows) -> Path:
    head = ("user_id,POI_id,POI_catid,POI_catid_code,POI_catname,latitude,longitude,timezone,UTC_time,local_time,"
            "day_of_week,norm_in_day_time,trajectory_id,norm_day_shift,norm_relative_time\n")
    body = "".join(f'{u},{p:024x},c{p % 4},{p % 4},"{c}",{lat},{lon},-300,{t:%Y-%m-%d %H:%M:%S}+00:00,x,0,0.5,'
                   f"{u}_{t:%j},0,0.5\n" for u, p, c, lat, lon, t in rows)
    path.write_text(head + body, encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_comapoi_plain(path: Path) -> list[dict]:
    """Every line is CoMaPOI's plain format, byte for byte as json.dumps writes the real files."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        record = json.loads(line)
        assert json.dumps(record, ensure_ascii=False) + "\n" == line
        system, user, answer = record["messages"]
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        header = re.match(r"<historical trajectory of user_(\d+)_subtrajectory_(\d+)>\n", user["content"])
        assert header, user["content"][:80]
        assert system["content"].startswith(f"Please predict the next one POI ID that user_{header.group(1)} will visit")
        body = user["content"][header.end():]
        found = CHECKIN.findall(body)
        assert found and " ".join(
            f"At {w}, {d}, user {u} visit POI ID {p} ({c}, {la},{lo})." for w, d, u, p, c, la, lo in found) == body
        assert all(u == header.group(1) for _, _, u, *_ in found)
        assert all(dt.datetime.strptime(w, "%Y-%m-%d %H:%M:%S").strftime("%A") == d for w, d, *_ in found)
        assert re.fullmatch(r'\{"next_poi_id": \d+\}', answer["content"])
        records.append(record)
    return records


def test_prepared_files_have_the_real_layout(tmp_path, registry_env):
    raw = write_tsmc(tmp_path / "dataset_TSMC2014_TEST.txt", generated_checkins())
    result = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "mycity", "--output-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "data" / "mycity"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["dataset.json", "mycity_poi_ids.csv", "mycity_poi_info.csv", "mycity_test.jsonl", "mycity_train.jsonl",
                     "mycity_user_ids.csv", "mycity_val.jsonl", "prepare.json", "prepare.rejects.jsonl"]
    # the real files' system prompt, character for character
    real_system = read_lines(REAL_DATA / "nyc_train.jsonl")[0]["messages"][0]["content"]
    train = assert_comapoi_plain(folder / "mycity_train.jsonl")
    assert train[0]["messages"][0]["content"] == real_system
    test = assert_comapoi_plain(folder / "mycity_test.jsonl")
    test_users = [re.search(r"user_(\d+)_subtrajectory_(\d+)", r["messages"][1]["content"]).groups() for r in test]
    assert len({u for u, _ in test_users}) == len(test_users) and all(s == "1" for _, s in test_users)  # one per user
    for record in train + test:  # at most 30 check-ins: 29 in the history and the label
        assert len(CHECKIN.findall(record["messages"][1]["content"])) <= 29
    # ids 0..N-1, POI table beside them; local time = UTC - 240 minutes
    poi_lines = (folder / "mycity_poi_info.csv").read_text(encoding="utf-8").splitlines()
    assert poi_lines[0] == "poi_id,category,lat,lon"
    assert [int(line.split(",")[0]) for line in poi_lines[1:]] == list(range(len(poi_lines) - 1))
    assert '"Bar, Pub"' in (folder / "mycity_poi_info.csv").read_text(encoding="utf-8")
    first = CHECKIN.findall(train[0]["messages"][1]["content"])[0]
    assert first[2] == "0" and first[3] == "0"  # user 0 (raw 100, the smallest id) visits POI 0 first
    record = json.loads((folder / "prepare.json").read_text())
    assert record["inputs"][0]["sha256"] and record["settings"]["min_user_checkins"] == 10
    assert record["settings"]["window"] == 30 and record["settings"]["split"] == [0.8, 0.1, 0.1]
    assert [s["step"] for s in record["steps"]] == ["read", "min_checkins", "local_time", "sessions", "split",
                                                    "seen_in_training", "ids", "trajectories"]
    assert record["id_maps"]["pois"] == len(poi_lines) - 1
    assert "mycity" in result.stdout and "train" in result.stdout


def test_rerun_is_identical_and_nothing_is_overwritten(tmp_path, registry_env):
    raw = write_tsmc(tmp_path / "raw.txt", generated_checkins(users=20, pois=60))
    out = tmp_path / "data"
    args = (str(raw), "--from", "tsmc2014", "--dataset", "city2", "--output-dir", str(out), "--min-poi-checkins", "5")
    assert prepare(registry_env, *args).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "city2").iterdir()}
    again = prepare(registry_env, *args)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert prepare(registry_env, *args, "--overwrite").returncode == 0
    assert {p.name: p.read_bytes() for p in (out / "city2").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_each_filter_on_hand_made_rows(tmp_path, registry_env):
    rows = []
    base = START

    def add(user, poi, hours):
        rows.append((user, poi, "Park", 40.7 + poi / 1000, -74.0, base + dt.timedelta(hours=hours)))

    for k in range(40):  # users 1 and 2: 40 check-ins each, two hours apart, over POIs 0-3
        add(1, k % 4, 2 * k)
        add(2, (k + 1) % 4, 2 * k + 0.5)
    for k in range(9):  # user 3: 9 check-ins -> dropped (fewer than 10)
        add(3, k % 4, k + 0.25)
    for k in range(6):  # user 4: 6 check-ins, a 25-hour gap, 6 more: two sessions
        add(4, k % 4, k + 0.1)
    for k in range(6):
        add(4, k % 4, 5.1 + 25 + k)
    add(1, 77, 79.9)  # the last check-in of all (test time) at a POI never seen in training
    for k in range(9):  # POI 77 visited enough to survive the POI filter (10 check-ins), all late, by user 2
        add(2, 77, 79.95 + k * 0.001)
    raw = write_tsmc(tmp_path / "hand.txt", rows)
    out = tmp_path / "data"
    result = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "hand", "--output-dir", str(out),
                     "--min-poi-checkins", "1", "--split", "70/10/20")
    assert result.returncode == 0, result.stdout + result.stderr
    users = (out / "hand" / "hand_user_ids.csv").read_text().splitlines()
    assert users == ["user_id,raw_user_id", "0,1", "1,2", "2,4"]  # user 3 (9 check-ins) dropped
    record = json.loads((out / "hand" / "prepare.json").read_text())
    assert record["steps"][1]["users"] == 3
    user4 = [r for r in read_lines(out / "hand" / "hand_train.jsonl") if "user_2_" in r["messages"][1]["content"]]
    assert len(user4) == 2  # the 25-hour gap cut user 4's 12 check-ins into two trajectories
    assert [len(CHECKIN.findall(r["messages"][1]["content"])) for r in user4] == [5, 5]
    seen = record["steps"][5]
    assert seen["step"] == "seen_in_training" and seen["unseen_poi_rows"] >= 1
    pois = {line.split(",")[1] for line in (out / "hand" / "hand_poi_ids.csv").read_text().splitlines()[1:]}
    assert "v00077" not in pois  # the test POI unseen in training is gone
    for name in ("hand_val.jsonl", "hand_test.jsonl"):
        text = (out / "hand" / name).read_text()
        assert text and all(int(p) < 4 for p in re.findall(r"POI ID (\d+)", text))

    # without the gap rule the same user has one trajectory
    again = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "hand", "--output-dir", str(out),
                    "--min-poi-checkins", "1", "--split", "70/10/20", "--session-gap-hours", "26", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert len([r for r in read_lines(out / "hand" / "hand_train.jsonl") if "user_2_" in r["messages"][1]["content"]]) == 1

    # everything filtered: one sentence naming the step and its threshold
    empty = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "hand2", "--output-dir", str(out),
                    "--min-user-checkins", "100")
    assert empty.returncode == 1
    assert "--min-user-checkins 100" in empty.stderr and "too few check-ins" in empty.stderr
    assert "Traceback" not in empty.stderr and not (out / "hand2").exists()


def test_bad_rows_go_to_the_rejects_file(tmp_path, registry_env):
    raw = write_tsmc(tmp_path / "raw.txt", generated_checkins(users=15, pois=30))
    lines = raw.read_bytes().split(b"\n")
    lines[3] = b"1\tonly\tthree"
    lines[5] = lines[5].replace(b"\t-240\t", b"\t-240\t").replace(b"\t34.", b"\tnorth")
    lines[7] = lines[7].rsplit(b"\t", 1)[0] + b"\tyesterday"
    lines[9] = lines[9].replace(b"Caf\xc3\xa9", b"Caf\xe9").replace(b"Subway", b"Sub\xffway")
    lines[11] = b""
    raw.write_bytes(b"\n".join(lines))
    out = tmp_path / "data"
    result = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "bad", "--output-dir", str(out),
                     "--encoding", "utf-8", "--min-poi-checkins", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    rejects = read_lines(out / "bad" / "prepare.rejects.jsonl")
    assert [(r["line"], r["reason"]) for r in rejects] == [(4, "columns"), (6, "bad_coordinates"), (8, "bad_time"),
                                                           (10, "invalid_utf8"), (12, "blank_line")]
    assert rejects[0]["text"] == "1\tonly\tthree" and "raw_base64" in rejects[3]
    record = json.loads((out / "bad" / "prepare.json").read_text())
    read = record["steps"][0]
    assert read["rows"] + read["rejected"] == read["lines"]
    assert "5 raw line(s) could not be read" in result.stderr + result.stdout


def test_latin1_tsmc_file_is_detected(tmp_path, registry_env):
    raw = write_tsmc(tmp_path / "latin.txt", generated_checkins(users=15, pois=30), encoding="latin-1")
    out = tmp_path / "data"
    result = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "latin", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Café" in (out / "latin" / "latin_poi_info.csv").read_text(encoding="utf-8")
    assert json.loads((out / "latin" / "prepare.json").read_text())["inputs"][0]["encoding"] == "latin-1"


def _synth_and_stats(out: Path, name: str, env: dict[str, str]) -> None:
    folder = out / name
    synth = run_comapoi("data", "synth", "--dataset", name, "--source", str(folder / f"{name}_train.jsonl"),
                        "--poi-info", str(folder / f"{name}_poi_info.csv"), "--output-dir", str(out), "--json", env=env)
    assert synth.returncode == 0, synth.stdout + synth.stderr
    assert json.loads(synth.stdout)["trajectories"] == len(read_lines(folder / f"{name}_train.jsonl"))
    stats = run_comapoi("data", "stats", "--dataset", name, "--data-dir", str(out), "--json", env=env)
    assert stats.returncode == 0, stats.stdout + stats.stderr


def test_gowalla_with_spots_and_region(tmp_path, registry_env):
    inside = generated_checkins(users=30, pois=150)
    outside = [(u + 1000, p, c, lat + 10, lon + 40, t) for u, p, c, lat, lon, t in generated_checkins(users=5, pois=150, seed=9)]
    raw = write_gowalla(tmp_path / "loc-gowalla_totalCheckins.txt", inside + outside)
    spots = tmp_path / "spots.csv"
    spots.write_text("id,created_at,lng,lat,spot_categories\n" + "".join(
        f"{9000 + p},2009,0,0,\"[{{'url': '/categories/{p}', 'name': 'Spot {p % 5}'}}]\"\n" for p in range(150)),
        encoding="utf-8")
    out = tmp_path / "data"
    result = prepare(registry_env, str(raw), "--from", "gowalla", "--spots", str(spots), "--region", "ca",
                     "--dataset", "gw", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((out / "gw" / "prepare.json").read_text())
    assert record["steps"][1]["step"] == "region" and record["steps"][1]["users"] == 30
    assert "Spot 3" in (out / "gw" / "gw_poi_info.csv").read_text()
    assert_comapoi_plain(out / "gw" / "gw_test.jsonl")
    _synth_and_stats(out, "gw", registry_env)


def test_getnext_generated_and_comapoi_resplit(tmp_path, registry_env):
    out = tmp_path / "data"
    raw = write_getnext(tmp_path / "NYC_train.csv", generated_checkins(users=30, pois=150))
    result = prepare(registry_env, str(raw), "--from", "getnext", "--dataset", "gn", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((out / "gn" / "prepare.json").read_text())
    assert "trajectory_id" in record["steps"][3]["rule"]  # its own sessions
    assert "Bar, Pub" in (out / "gn" / "gn_poi_info.csv").read_text()
    _synth_and_stats(out, "gn", registry_env)

    # CoMaPOI's own real files, re-split per user by time (what tky / ca need); ids are kept
    result = prepare(registry_env, str(REAL_DATA / "nyc_train.jsonl"), str(REAL_DATA / "nyc_test.jsonl"), "--from", "comapoi",
                     "--dataset", "nycsplit", "--output-dir", str(out), "--min-poi-checkins", "1",
                     "--session-gap-hours", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    train = assert_comapoi_plain(out / "nycsplit" / "nycsplit_train.jsonl")
    assert train and assert_comapoi_plain(out / "nycsplit" / "nycsplit_test.jsonl")
    real_pois = {line.split(",")[0]: line for line in (REAL_DATA / "nyc_poi_info.csv").read_text(encoding="utf-8").splitlines()}
    first = CHECKIN.findall(train[0]["messages"][1]["content"])[0]
    assert first[3] in real_pois  # the published id is kept
    # a prepared folder holds trajectories, not agent files: the hint says how to read and build from them
    stats = run_comapoi("data", "stats", "--dataset", "nycsplit", "--data-dir", str(out), env=registry_env)
    assert stats.returncode != 0 and "Traceback" not in stats.stderr
    assert "holds trajectories (nycsplit_train.jsonl)" in stats.stderr and "comapoi data build --dataset nycsplit" in stats.stderr
    _synth_and_stats(out, "nycsplit", registry_env)


def test_real_getnext_head(tmp_path, registry_env):
    out = tmp_path / "data"
    default = prepare(registry_env, str(RAW / "nyc_getnext_val_head.csv"), "--from", "getnext", "--dataset", "head",
                      "--output-dir", str(out))
    assert default.returncode == 1 and "--min-user-checkins 10" in default.stderr  # 25 rows: nobody has 10
    result = prepare(registry_env, str(RAW / "nyc_getnext_val_head.csv"), "--from", "getnext", "--dataset", "head",
                     "--output-dir", str(out), "--min-user-checkins", "1", "--min-poi-checkins", "1", "--keep-unseen",
                     "--session-gap-hours", "0", "--split", "50/10/40")
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((out / "head" / "prepare.json").read_text())
    assert record["steps"][0]["rows"] == 25 and record["steps"][0]["rejected"] == 0
    test = assert_comapoi_plain(out / "head" / "head_test.jsonl")
    assert test
    assert "(Bar, 40.96517162512245,-74.06274608234698)" in (out / "head" / "head_train.jsonl").read_text() + \
        (out / "head" / "head_test.jsonl").read_text() + (out / "head" / "head_val.jsonl").read_text() or \
        "Bar,40.96517162512245,-74.06274608234698" in (out / "head" / "head_poi_info.csv").read_text()
    stats = run_comapoi("data", "stats", str(out / "head" / "head_test.jsonl"), "--dataset", "head", "--json", env=registry_env)
    assert stats.returncode == 0, stats.stderr
    # 25 POIs are too few for the agent records' 100 distinct candidates: one sentence (it used to loop forever)
    synth = run_comapoi("data", "synth", "--dataset", "head", "--source", str(out / "head" / "head_train.jsonl"),
                        "--output-dir", str(out), env=registry_env, timeout=120)
    assert synth.returncode == 1 and "at least 100 POIs" in synth.stderr and "Traceback" not in synth.stderr


def test_a_plugin_reader(tmp_path, registry_env):
    from tests.test_plugins import make_entry_point_plugin

    plugin = """
    from comapoi_cli import hookimpl
    from comapoi_cli.data.checkins.readers import CheckinReader, Tsmc2014Reader

    class Semicolons(CheckinReader):
        name = "semicolons"
        description = "tsmc2014 with semicolons"

        def read(self, paths, options):
            import pathlib
            fixed = []
            for path in paths:
                target = pathlib.Path(str(path) + ".tsv")
                target.write_text(path.read_text().replace(";", "\\t"))
                fixed.append(target)
            return Tsmc2014Reader().read(fixed, options)

    @hookimpl
    def register_checkin_readers(register):
        register(Semicolons())
    """
    (tmp_path / "site").mkdir()
    make_entry_point_plugin(tmp_path / "site", "semicolon_reader", plugin)
    env = {**registry_env, "PYTHONPATH": str(tmp_path / "site")}
    listed = run_comapoi("data", "prepare", "--list-formats", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert {"tsmc2014", "gowalla", "getnext", "comapoi", "semicolons"} <= {f["format"] for f in json.loads(listed.stdout)}
    raw = write_tsmc(tmp_path / "semi.txt", generated_checkins(users=15, pois=30))
    raw.write_text(raw.read_text().replace("\t", ";"))
    result = run_comapoi("data", "prepare", str(raw), "--from", "semicolons", "--dataset", "semi", "--output-dir",
                         str(tmp_path / "data"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert assert_comapoi_plain(tmp_path / "data" / "semi" / "semi_test.jsonl")
    unknown = run_comapoi("data", "prepare", str(raw), "--from", "nosuch", "--dataset", "x", env=env)
    assert unknown.returncode == 2 and "semicolons" in unknown.stderr


def test_train_and_pipeline_use_a_prepared_city(tmp_path, registry_env):
    """A new city, prepared, then synth --source, train --model tiny and pipeline run: no flag more."""
    out = tmp_path / "data"
    raw = write_tsmc(tmp_path / "raw.txt", generated_checkins(users=12, pois=120, per_user=40))
    result = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "newcity", "--output-dir", str(out),
                     "--min-poi-checkins", "2", "--window", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "datasets" / "newcity.json").is_file()
    synth = run_comapoi("data", "synth", "--dataset", "newcity", "--source", str(out / "newcity" / "newcity_train.jsonl"),
                        "-n", "12", "--output-dir", str(out), env=registry_env)
    assert synth.returncode == 0, synth.stdout + synth.stderr
    runs = tmp_path / "runs"
    train = run_comapoi("train", "--dataset", "newcity", "--data-dir", str(out), "--type", "merged", "--model", "tiny",
                        "--seq-length", "1536", "--batch-size", "2", "--test-size", "4", "--max_steps", "2",
                        "--save_freq", "2", "--output_dir", str(runs), env=registry_env)
    assert train.returncode == 0, train.stdout + train.stderr
    (run_json,) = list(runs.glob("*/sft-newcity/*/run.json"))
    chain = run_comapoi("pipeline", "run", "--dataset", "newcity", "--test", str(out / "newcity" / "newcity_test.jsonl"),
                        "--merged", str(run_json.parent), "--limit", "2", "--max-new-tokens", "8",
                        "--output-dir", str(tmp_path / "chain"), env=registry_env)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    assert len((tmp_path / "chain" / "predictions.jsonl").read_text().splitlines()) == 2
    # the city is unknown without the record
    other = run_comapoi("pipeline", "run", "--dataset", "newcity", "--test", str(out / "newcity" / "newcity_test.jsonl"),
                        "--merged", str(run_json.parent), "--limit", "1", "--output-dir", str(tmp_path / "chain2"),
                        env={"COMAPOI_DATASETS_DIR": str(tmp_path / "elsewhere")})
    assert other.returncode == 2 and "Unknown dataset 'newcity'" in other.stderr


def test_a_killed_run_leaves_no_partial_output(tmp_path, registry_env):
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = write_tsmc(tmp_path / "big.txt", generated_checkins(users=400, pois=600, per_user=400))
    out = tmp_path / "data"
    out.mkdir()
    cmd = [sys.executable, "-m", "comapoi_cli", "data", "prepare", str(raw), "--from", "tsmc2014", "--dataset", "killme",
           "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, **registry_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [p for p in out.iterdir() if p.name.startswith(".killme.")] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed: make the input larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "killme").exists()  # only the temporary folder is left
    assert [p for p in out.iterdir() if p.name.startswith(".killme.")]
    again = prepare(registry_env, str(raw), "--from", "tsmc2014", "--dataset", "killme", "--output-dir", str(out))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["killme"]  # the dead run's temporary folder is gone
