"""The bundled client: its options, and against a real TorchServe (describe, formats, where it writes, keys)."""

import json

import pytest
from PIL import Image

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


def test_the_command_line_sets_loras_controlnets_and_outpainting(tmp_path):
    from sdclient.client import build_parser, request_fields

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"a file")
    arguments = build_parser().parse_args([
        "a fox", "--lora", "anime:0.8", "--lora", "sketch", "--controlnet", "edges", "--control-image", str(photo),
        "--control-preprocess", "canny", "--control-scale", "0.5", "--image", str(photo),
        "--outpaint", "left=128,right=64"])
    fields = request_fields(arguments)
    assert fields["loras"] == [{"name": "anime", "scale": 0.8}, {"name": "sketch"}]
    assert (fields["controlnet"], fields["control_preprocess"], fields["controlnet_conditioning_scale"]) == \
        ("edges", "canny", 0.5)
    assert fields["control_image"] == fields["image"] == "YSBmaWxl"
    assert fields["outpaint"] == {"left": 128, "right": 64}
    two = request_fields(build_parser().parse_args(["a fox", "--controlnet", "edges", "--controlnet", "depth"]))
    assert two["controlnet"] == ["edges", "depth"] and two["loras"] is None


@pytest.mark.parametrize("option", [["--lora", "anime:strong"], ["--outpaint", "left"]])
def test_a_malformed_option_names_its_form(option, capsys):
    with pytest.raises(SystemExit):
        main(["a fox", *option])
    assert option[0] in capsys.readouterr().err


def test_without_output_it_writes_into_out_named_by_seed_and_in_the_asked_format(torchserve, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["a red fox", "--seed", "11", "--steps", "2", "--width", "64", "--height", "64", "--format", "jpeg",
                 "--url", torchserve.inference_url, "--token-file", str(torchserve.folder / "key_file.json")])
    assert code == 0
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    saved = Image.open(tmp_path / "out" / "sdclient-11.jpeg")
    assert saved.format == "JPEG" and saved.size == (64, 64)
    assert "sdclient-11.jpeg  seed=11" in capsys.readouterr().out


def test_a_stale_key_file_gets_a_hint_not_a_raw_exception(torchserve, tmp_path, capsys):
    stale = tmp_path / "key_file.json"
    stale.write_text(json.dumps({"inference": {"key": "stale"}, "management": {"key": "stale"}}))
    code = main(["a red fox", "--url", torchserve.inference_url, "--token-file", str(stale)])
    assert code == 1
    error = capsys.readouterr().err
    assert "InvalidKeyException" not in error and "--token-file FOLDER/key_file.json" in error and "stale" in error


def test_wait_ready_returns_once_the_model_has_a_ready_worker(torchserve, capsys):
    code = main(["--wait-ready", "30", "--management-url", torchserve.management_url,
                 "--token-file", str(torchserve.folder / "key_file.json")])
    assert code == 0 and "READY worker" in capsys.readouterr().err
