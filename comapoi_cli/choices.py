"""The value sets several commands share, as ``Literal`` types and their tuples (one home).

Core, light: ``training/job.py`` (``train --quant``), ``models/loading.py`` (``eval``/``pipeline``
``--quant``, the load ``dtype``), ``adapters/merge.py`` (``--dtype``) and the command line read them here.
"""

from __future__ import annotations

from typing import Literal, get_args

#: How base weights are quantised: ``auto`` (the run's on a GPU, none on the CPU), 4-bit, 8-bit, none.
Quant = Literal["auto", "4bit", "8bit", "none"]
QUANT_CHOICES: tuple[str, ...] = get_args(Quant)
#: The torch dtypes a model is loaded or merged in.
Dtype = Literal["bfloat16", "float16", "float32"]
DTYPE_CHOICES: tuple[str, ...] = get_args(Dtype)
#: The quantised ones of ``Quant`` (bitsandbytes, a CUDA GPU).
QUANTISED: tuple[str, ...] = ("4bit", "8bit")
#: The 16-bit ones of ``Dtype`` (a GPU keeps a recorded 16-bit dtype).
HALF_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
