"""LoRA in-process: the tiny adapters of each family, switching and unloading, the contract's loras field, and
build_mar.sh refusing files that do not fit (LoRAs and VAEs), all on tiny random pipelines built here."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from builder.tiny_adapters import make_tiny_lora
from builder.tiny_pipeline import build_tiny_pipeline
from helpers import REPO_ROOT
from handler.core.capabilities import ModelCapabilities
from handler.core.contract import Contract, GenerationRequest
from handler.core.failures import Rejection
from handler.core.generation import GenerationEngine, plan_groups
from handler.core.settings import HandlerSettings, SettingsError
from handler.model.adapters import LoraAdapters, LoraError, check_lora, find_loras, serve_loras
from handler.model.device import Placement
from handler.model.loading import load_pipeline, optimize_pipeline, read_pipeline


FAMILIES = ("sd1", "sdxl", "sd3", "flux")
KOHYA = ("sd1", "sdxl")  # the UNet families, whose kohya names follow the module paths


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """A tiny pipeline per family with LoRA support checked here, and its LoRAs: a (diffusers format, seed 1),
    a_kohya (the same weights in kohya format, UNet families) and b (seed 2)."""
    folders = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        build_tiny_pipeline(root / "pipeline", family)
        loras = {"a": make_tiny_lora(root / "pipeline", root / "loras" / "a.safetensors", seed=1),
                 "b": make_tiny_lora(root / "pipeline", root / "loras" / "b.safetensors", seed=2)}
        if family in KOHYA:
            loras["a_kohya"] = make_tiny_lora(root / "pipeline", root / "loras" / "a_kohya.safetensors", seed=1,
                                              lora_format="kohya")
        folders[family] = (root / "pipeline", loras)
    return folders


def engine_with_loras(folder, loras, max_loaded=4):
    pipeline = load_pipeline(folder, Placement("cpu", torch.float32))
    adapters = LoraAdapters(pipeline, loras, max_loaded)
    return GenerationEngine(pipeline, 10**8, loras=adapters), adapters


def image(engine, loras=(), seed=5):
    request = GenerationRequest(prompt="a cat", negative_prompt=None, num_inference_steps=2, guidance_scale=3.5,
                                width=64, height=64, seeds=(seed,), scheduler=None, loras=tuple(loras))
    (result,) = engine.generate([request])
    return result.images[0].astype(int)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_lora_changes_the_image_at_scale_1_and_not_at_scale_0(family_folders, family):
    engine, _ = engine_with_loras(*family_folders[family])
    base = image(engine)
    assert np.array_equal(image(engine, [("a", 0.0)]), base)
    with_a = image(engine, [("a", 1.0)])
    assert np.abs(with_a - base).max() > 10
    both = image(engine, [("a", 1.0), ("b", 1.0)])
    assert np.abs(both - with_a).max() > 10 and np.abs(both - image(engine, [("b", 1.0)])).max() > 10
    # Back to no LoRA: the base image again, whatever ran before.
    assert np.array_equal(image(engine), base)
    if family in KOHYA:
        assert np.abs(image(engine, [("a_kohya", 1.0)]) - with_a).max() <= 1  # kohya file, same weights


def test_least_recently_used_adapter_is_unloaded_and_reloads_to_the_same_image(family_folders):
    folder, loras = family_folders["sd1"]
    engine, adapters = engine_with_loras(folder, loras, max_loaded=2)
    first_a = image(engine, [("a", 1.0)])
    image(engine, [("b", 0.7)])
    image(engine, [("a_kohya", 1.0)])  # a is the least recently used: unloaded
    assert sorted(adapters.pipeline.get_list_adapters()["unet"]) == ["a_kohya", "b"]
    assert np.array_equal(image(engine, [("a", 1.0)]), first_a)
    assert sorted(adapters.pipeline.get_list_adapters()["unet"]) == ["a", "a_kohya"]


def hot_swapping_engine(folder, loras, settings):
    """An engine whose adapters swap into max_loras slots prepared before compiling, as the handler sets it up."""
    placement = Placement("cpu", torch.float32)
    pipeline = read_pipeline(folder, placement, settings)
    adapters = serve_loras(pipeline, loras, settings.max_loras, settings.max_loaded_loras, hotswap=True)
    optimize_pipeline(pipeline, placement, settings)
    return GenerationEngine(pipeline, 10**8, loras=adapters)


SWAPS = [(), (("a", 1.0),), (("a", 0.5), ("b", 1.0)), (("a_kohya", 1.0), ("b", 0.3)), (("b", 1.0),), ()]


@pytest.mark.parametrize("family", FAMILIES)
def test_hot_swapped_slots_give_the_images_of_resident_adapters(family_folders, family):
    folder, loras = family_folders[family]
    if family not in KOHYA:
        loras = {**loras, "a_kohya": loras["a"]}
    resident, _ = engine_with_loras(folder, loras)
    swapping = hot_swapping_engine(folder, loras, HandlerSettings(max_loras=2, max_loaded_loras=2))
    for selection in SWAPS:
        assert np.abs(image(swapping, selection) - image(resident, selection)).max() <= 1, selection


def test_with_torch_compile_switching_loras_and_scales_never_recompiles(family_folders):
    """One compile at the first call (about 40 s on 2 CPU cores); every later switch must reuse that graph."""
    folder, loras = family_folders["sd1"]
    resident, _ = engine_with_loras(folder, loras)
    compiled = hot_swapping_engine(folder, loras, HandlerSettings(max_loras=2, max_loaded_loras=2,
                                                                  torch_compile=True))
    image(compiled, SWAPS[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for selection in SWAPS[1:]:
            assert np.abs(image(compiled, selection) - image(resident, selection)).max() <= 2, selection


def test_a_lora_for_another_family_is_refused_naming_the_file(family_folders):
    sd1_folder, sd1_loras = family_folders["sd1"]
    sdxl_pipeline = load_pipeline(family_folders["sdxl"][0], Placement("cpu", torch.float32))
    with pytest.raises(LoraError, match=r"a\.safetensors does not fit StableDiffusionXLPipeline.*size mismatch"):
        check_lora(sdxl_pipeline, sd1_loras["a"])
    sd1_pipeline = load_pipeline(sd1_folder, Placement("cpu", torch.float32))
    with pytest.raises(LoraError, match="none of its weights name a module"):
        check_lora(sd1_pipeline, family_folders["flux"][1]["a"])
    assert sd1_pipeline.get_list_adapters() == {}  # a refused file leaves nothing loaded


def test_lora_dir_files_are_found_by_name_and_the_misfits_dropped_at_start_up(family_folders, tmp_path):
    folder, loras = family_folders["sd1"]
    model_dir, lora_dir = tmp_path / "model", tmp_path / "mounted"
    (model_dir / "loras").mkdir(parents=True)
    lora_dir.mkdir()
    (model_dir / "loras" / "a.safetensors").write_bytes(loras["a"].read_bytes())
    (lora_dir / "b.safetensors").write_bytes(loras["b"].read_bytes())
    (lora_dir / "xl.safetensors").write_bytes(family_folders["sdxl"][1]["a"].read_bytes())
    (lora_dir / "-bad name.safetensors").write_bytes(loras["b"].read_bytes())
    (lora_dir / "notes.txt").write_text("not a LoRA")
    files = find_loras(model_dir, str(lora_dir))
    assert sorted(files) == ["a", "b", "xl"]
    adapters = LoraAdapters(load_pipeline(folder, Placement("cpu", torch.float32)), files, 4)
    dropped = adapters.check_all()
    assert adapters.names == ("a", "b") and len(dropped) == 1 and "xl.safetensors" in dropped[0]

    (lora_dir / "a.safetensors").write_bytes(loras["a"].read_bytes())
    with pytest.raises(LoraError, match="two LoRA files are named a"):
        find_loras(model_dir, str(lora_dir))
    with pytest.raises(LoraError, match="is not a folder"):
        find_loras(model_dir, str(tmp_path / "missing"))


# --- The contract's loras field --------------------------------------------------------------------------------

@pytest.fixture
def contract():
    return Contract(HandlerSettings(max_loras=2), ModelCapabilities(loras=("anime", "pixel", "sketch")))


def test_loras_are_read_sorted_with_default_scales(contract):
    body = {"prompt": "x", "loras": [{"name": "pixel", "scale": 0.5}, {"name": "anime"}]}
    assert contract.parse(body).generation.loras == (("anime", 1.0), ("pixel", 0.5))
    as_form = contract.parse({"prompt": "x", "loras": json.dumps(body["loras"])}, from_form=True)
    assert as_form.generation.loras == (("anime", 1.0), ("pixel", 0.5))
    assert contract.parse({"prompt": "x"}).generation.loras == ()


@pytest.mark.parametrize("loras, message", [
    ([{"name": "nope"}], r"loras\[0\].name 'nope' is not a LoRA of this model; available: \['anime', 'pixel', "
                         r"'sketch'\]"),
    ([{"name": "anime"}, {"name": "pixel"}, {"name": "sketch"}], "at most 2"),
    ([{"name": "anime"}, {"name": "anime", "scale": 0.5}], "named twice"),
    ([{"name": "anime", "scale": 3}], r"loras\[0\].scale must be a finite number at least -2 and at most 2"),
    ([{"name": "anime", "scale": "1"}], r"loras\[0\].scale must be"),
    ([{"name": "anime", "path": "/etc/passwd"}], "must be an object with a name and optionally a scale"),
    ([{"name": "../../etc/passwd"}], "is not a LoRA of this model"),
    ({"name": "anime"}, "must be a list"),
    (["anime"], "must be an object"),
])
def test_bad_loras_are_400s_naming_the_field(contract, loras, message):
    with pytest.raises(Rejection, match=message) as caught:
        contract.parse({"prompt": "x", "loras": loras})
    assert caught.value.field == "loras"


def test_a_model_without_loras_refuses_the_field_and_leaves_it_out_of_the_schema():
    contract = Contract(HandlerSettings())
    with pytest.raises(Rejection, match="loras is not supported by StableDiffusionPipeline: it needs LoRA files"):
        contract.parse({"prompt": "x", "loras": []})
    assert "loras" not in contract.json_schema()["properties"]


def test_the_schema_lists_the_names_and_the_limit(contract):
    schema = contract.json_schema()["properties"]["loras"]
    assert schema["maxItems"] == 2
    assert schema["items"]["properties"]["name"]["enum"] == ["anime", "pixel", "sketch"]
    assert schema["items"]["properties"]["scale"]["default"] == 1.0


def test_requests_with_different_lora_sets_never_share_a_pipeline_call(contract):
    def request(loras):
        return contract.parse({"prompt": "x", "width": 64, "height": 64, "loras": loras}).generation

    requests = [request([]), request([{"name": "anime"}]), request([{"name": "anime", "scale": 1.0}]),
                request([{"name": "anime", "scale": 0.5}]), request([{"name": "pixel"}, {"name": "anime"}]),
                request([{"name": "anime"}, {"name": "pixel"}])]
    assert plan_groups(requests, 10**9) == [[0], [1, 2], [3], [4, 5]]


def test_max_loaded_loras_must_hold_one_requests_set():
    with pytest.raises(SettingsError, match="max_loaded_loras must be at least max_loras"):
        HandlerSettings.from_mapping({"max_loras": 4, "max_loaded_loras": 3})


# --- build_mar.sh: --lora and --vae -----------------------------------------------------------------------------

def build_mar(tmp_path, *arguments):
    return subprocess.run([str(REPO_ROOT / "build_mar.sh"), "--export-path", str(tmp_path / "store"),
                           "--work-dir", str(tmp_path / "work"), *map(str, arguments)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                               "HF_HUB_OFFLINE": "1"})


def test_build_mar_packs_loras_and_refuses_one_for_another_family(family_folders, tmp_path):
    loras = family_folders["sd1"][1]
    built = build_mar(tmp_path, "--tiny", "--lora", f"anime={loras['a']}", "--lora", f"sketch={loras['a_kohya']}")
    assert built.returncode == 0, built.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "store" / "stable_diffusion.mar") as archive:
        assert {"loras/anime.safetensors", "loras/sketch.safetensors"} <= set(archive.namelist())

    refused = build_mar(tmp_path, "--tiny", "--family", "sdxl", "--name", "xl", "--lora", f"anime={loras['a']}")
    assert refused.returncode != 0
    assert f"refusing --lora anime={loras['a']}" in refused.stderr and "size mismatch" in refused.stderr
    assert not (tmp_path / "store" / "xl.mar").exists()
    for bad, why in ((f"Bad/Name={loras['a']}", "LoRA name"), ("anime", "NAME=PATH"),
                     (f"anime={tmp_path}/missing.safetensors", "is not a .safetensors file")):
        refused = build_mar(tmp_path, "--tiny", "--name", "bad", "--lora", bad)
        assert refused.returncode != 0 and why in refused.stderr, refused.stderr[-500:]


def test_build_mar_swaps_the_vae_and_refuses_one_of_another_family(family_folders, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(family_folders["sd1"][0] / "vae")
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    vae.save_pretrained(tmp_path / "better-vae")
    built = build_mar(tmp_path, "--tiny", "--vae", tmp_path / "better-vae", "--archive-format", "no-archive")
    assert built.returncode == 0, built.stderr[-2000:]
    packed = tmp_path / "store" / "stable_diffusion" / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors"
    assert packed.read_bytes() == (tmp_path / "better-vae" / "diffusion_pytorch_model.safetensors").read_bytes()

    refused = build_mar(tmp_path, "--tiny", "--name", "wrong", "--vae", family_folders["flux"][0] / "vae")
    assert refused.returncode != 0
    assert "its latent_channels is 16, the pipeline's VAE has 4" in refused.stderr
