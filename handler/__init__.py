"""The serving package: what a TorchServe worker runs, and all that an archive ships.

One thing happens on import, before anything imports diffusers: peft imports torchao whenever it is installed
(the test and quantization extras install it), and torchao logs a warning for each of its CUDA-only kernel
libraries (``_C_mxfp8``, ``_C_cutlass_90a``) that cannot load beside a CPU build of torch. Every build and
every worker start printed those. The filter drops exactly those messages, and only where torch has no CUDA;
torchao's other messages, and all of them on a CUDA build, still show.
"""

import logging


class CudaOnlyTorchaoLibraries(logging.Filter):
    """Drop torchao's "Failed to load .../torchao/_C_*.so" warnings on a CPU build of torch."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not (message.startswith("Failed to load ") and "/torchao/_C_" in message):
            return True
        import torch  # already imported: torchao imports it before loading its libraries

        return torch.version.cuda is not None


logging.getLogger("torchao").addFilter(CudaOnlyTorchaoLibraries())
