"""The bundled client against a real TorchServe: --describe prints what the served model accepts."""

import json

import pytest

from sdclient.client import main

pytestmark = pytest.mark.serving


def test_describe_prints_the_served_schema_and_capabilities(torchserve, capsys):
    code = main(["--describe", "--management-url", torchserve.management_url,
                 "--token-file", str(torchserve.folder / "key_file.json")])
    assert code == 0
    described = json.loads(capsys.readouterr().out)
    assert described["capabilities"]["size_multiple"] == 8
    assert described["request_schema"]["required"] == ["prompt"]
    assert "scheduler" in described["request_schema"]["properties"]


def test_a_prompt_is_required_without_describe(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "prompt is required" in capsys.readouterr().err
