"""The run folder: its layout (``layout``), the one writer of run.json (``record``), the one reader
(``info``), the folder's lock (``lock``), how a run starts in it (``start``) and the conversation
keys of the data it trained on (``datakeys``). Nothing here imports torch at import time."""
