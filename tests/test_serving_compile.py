"""A real TorchServe worker with torch_compile: true compiles at its warm-up sizes and never again for requests
at those sizes, whatever their scheduler (TORCH_LOGS=recompiles makes torch log every recompile in the worker
log).

The compile backend is ``eager``: Dynamo traces, guards and recompiles exactly as with inductor (recompiles are
decided by the guards, before any backend runs), without inductor's minutes of code generation on 2 cores.
"""

import re

import pytest

from helpers import SMALL, build_tiny_mar, log_offset, log_since, model_log, predict, start_server, stop_server

pytestmark = pytest.mark.serving
RECOMPILING = "Recompiling function"


@pytest.fixture(scope="module")
def compiled_server(tmp_path_factory):
    mar = build_tiny_mar(tmp_path_factory.mktemp("compile"), {"minWorkers": 1, "maxWorkers": 1},
                         {"torch_compile": True, "compile_backend": "eager", "compile_warmup_sizes": ["64x64", "64x64x2"]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_LOGS", "recompiles")  # the workers inherit the server's environment
        server = start_server(tmp_path_factory.mktemp("compile-server"), mar)
    try:
        yield server
    finally:
        stop_server(server)


def test_requests_at_warmed_sizes_do_not_recompile(compiled_server):
    compiled = re.search(r"torch.compile compiled (\d+) graph\(s\) during warm-up at 64x64x1, 64x64x2",
                         model_log(compiled_server))
    assert compiled and int(compiled.group(1)) >= 1
    offset = log_offset(compiled_server)
    for extra in ({}, {"num_images": 2}, {"scheduler": "euler"}, {"scheduler": "ddim", "num_images": 2}):
        response = predict(compiled_server, {"prompt": "a cat", **SMALL, **extra, "output_format": "npy"})
        assert response.status_code == 200, response.text
    assert RECOMPILING not in log_since(compiled_server, offset)


def test_an_unwarmed_shape_shows_in_the_log(compiled_server):
    """The control: a non-square size was not warmed (the warm-up's square sizes let Dynamo assume width ==
    height), so it recompiles, and the log says so."""
    offset = log_offset(compiled_server)
    response = predict(compiled_server, {"prompt": "a cat", **SMALL, "width": 96, "output_format": "npy"})
    assert response.status_code == 200, response.text
    assert RECOMPILING in log_since(compiled_server, offset)
