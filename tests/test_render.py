"""Tables fit the terminal: columns are dropped in a stated order instead of squeezing every one."""

from __future__ import annotations

from comapoi_cli.cli.render import fit_columns

COLUMNS = ["run", "dataset", "type", "base model", "size", "status"]
ROWS = [["output/tiny/sft-nyc/bs4-gas1-ms40-agent3-lr0.005", "nyc", "agent3", "/models/qwen2.5-7b-instruct", "91.4 KB", "finished"]]


def test_a_wide_terminal_keeps_every_column():
    columns, rows = fit_columns(COLUMNS, ROWS, 200, drop_first=("base model", "size"), keep_wide="run")
    assert columns == COLUMNS and rows == ROWS


def test_a_narrow_terminal_drops_columns_in_the_given_order_only():
    # widths: run 40 (wraps), dataset 7, type 6, base model 27, size 7, status 8; 3 more each, 1 border: 114
    columns, _ = fit_columns(COLUMNS, ROWS, 90, drop_first=("base model", "size", "dataset"), keep_wide="run")
    assert columns == ["run", "dataset", "type", "size", "status"]  # 84 cells: dropping base model was enough
    columns, rows = fit_columns(COLUMNS, ROWS, 80, drop_first=("base model", "size", "dataset"), keep_wide="run")
    assert columns == ["run", "dataset", "type", "status"]  # 74 cells
    assert rows == [[ROWS[0][0], "nyc", "agent3", "finished"]]
    columns, _ = fit_columns(COLUMNS, ROWS, 20, drop_first=("base model", "size"), keep_wide="run")
    assert columns == ["run", "dataset", "type", "status"]  # never drops a column it was not told it may
