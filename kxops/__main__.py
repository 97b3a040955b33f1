"""``python -m kxops``: print versions, build facts and the backend of each op."""

import torch

from kxops import _ext
from kxops._info import format_info, info

print(format_info(info()))
if _ext.LOADED:
    # Which copy of the AdaX CPU kernel runs (csrc/adax_cpu.h; ATEN_CPU_CAPABILITY lowers it).
    print(f"AdaX CPU kernel: {torch.ops.kxops._adax_cpu_kernel()}")
