"""torchao's CUDA-only kernel libraries fail to load beside a CPU torch: that one warning is dropped, no other."""

import logging

import handler  # noqa: F401  (installs the filter, as every worker and build does before importing diffusers)


def test_only_the_cuda_library_warnings_of_torchao_are_dropped_on_a_cpu_torch(caplog):
    logger = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logger.warning("Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
                       "Could not load this library")
        logger.warning("Failed to load /venv/site-packages/other/_C_mxfp8.so: a library of another package")
        logger.warning("Skipping import of cpp extensions due to incompatible torch version")
    assert [record.getMessage()[:40] for record in caplog.records] == [
        "Failed to load /venv/site-packages/other", "Skipping import of cpp extensions due to"]


def test_importing_diffusers_prints_no_torchao_library_warning():
    import subprocess
    import sys

    imported = subprocess.run([sys.executable, "-c", "import handler.core.schedulers"], capture_output=True,
                              text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "_C_mxfp8" not in imported.stderr and "Failed to load" not in imported.stderr
