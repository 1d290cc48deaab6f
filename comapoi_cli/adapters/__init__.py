"""Trained adapters: finding and describing runs (``listing``), merging one into its base model
(``merge``) and exporting several for serving (``export``). The names of ``listing`` are
importable from here. Nothing here imports torch at import time."""

from comapoi_cli.adapters.listing import (
                                          ENV_OUTPUT_DIR,
                                          SORT_KEYS,
                                          AdapterRun,
                                          default_roots,
                                          describe_run,
                                          filter_runs,
                                          load_run,
                                          require_run_folder,
                                          safetensors_parameters,
                                          scan_runs,
                                          sort_runs,
                                          write_loss_plot,
)

__all__ = ["ENV_OUTPUT_DIR", "SORT_KEYS", "AdapterRun", "default_roots", "describe_run", "filter_runs", "load_run",
           "require_run_folder", "safetensors_parameters", "scan_runs", "sort_runs", "write_loss_plot"]
