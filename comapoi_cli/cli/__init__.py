"""The command line: one small module per command group, wired together in ``app.py``.

Commands parse arguments and render results; the work is done by the services in
``comapoi_cli`` (data, training, adapters, evaluation), which never print.
"""
