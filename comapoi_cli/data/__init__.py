"""Data services: clean, split, merge, stats, synth, and the training step's preparation.

Plain functions and dataclasses; nothing here prints. The ``comapoi data`` commands
(``comapoi_cli/cli/data.py``) parse arguments, call these and render the results.
Heavy modules (transformers, matplotlib) are imported inside the functions that need them.
"""

from __future__ import annotations

from comapoi_cli.data.clean import CleanSummary, clean_file, default_rejects_path, read_rejects
from comapoi_cli.data.layout import MERGED_CLEAN_STEM, MERGED_FILE, dataset_dir, default_data_dir, split_names
from comapoi_cli.data.merge import MergeSummary, merge_files, parse_weights
from comapoi_cli.data.policies import CHECKS, POLICIES, parse_policy_options, resolve_policies
from comapoi_cli.data.prepare import PreparedData, prepare_training_data
from comapoi_cli.data.records import find_label_leak
from comapoi_cli.data.split import SplitSummary, parse_test_size, split_file
from comapoi_cli.errors import DataError

__all__ = [
    "CHECKS", "POLICIES", "CleanSummary", "DataError", "MERGED_CLEAN_STEM", "MERGED_FILE", "MergeSummary",
    "PreparedData", "SplitSummary", "clean_file", "dataset_dir", "default_data_dir", "default_rejects_path",
    "find_label_leak", "merge_files", "parse_policy_options", "parse_test_size", "parse_weights",
    "prepare_training_data", "read_rejects", "resolve_policies", "split_file", "split_names",
]


def __getattr__(name: str):  # lazy: stats and synth pull in more than the training step needs
    if name in ("compute_stats", "StatsReport"):
        from comapoi_cli.data import stats

        return getattr(stats, name)
    if name in ("synth_dataset", "SynthSummary"):
        from comapoi_cli.data import synth

        return getattr(synth, name)
    raise AttributeError(name)
