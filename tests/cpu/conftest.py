"""CPU tests run Triton kernels in the interpreter; it must be chosen before kernels are defined."""

import os

os.environ["TRITON_INTERPRET"] = "1"
