"""``comapoi pipeline``: run the trained agents as CoMaPOI chains them, and score the chain.

- :mod:`.chain`: what a role sees (``ChainItem``, ``ChainContext``);
- :mod:`.inputs`: the test trajectories, the POI table and the training trajectories;
- :mod:`.checks`: the checks before scoring (dataset identity, leakage, locks, outputs that are inputs);
- :mod:`.retrieval` / :mod:`.engines`: the retriever and engine interfaces (plugin hooks);
- :mod:`.runner`: ``run_pipeline`` (the chain, predictions written as it goes, ``--resume``);
- :mod:`.scoring`: the scores of a predictions file (metrics, per-stage recall, baselines, compat).

Services only: no printing, no Rich; they report through ``comapoi_cli.reporting.Reporter``.
"""
