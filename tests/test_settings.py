"""HandlerSettings.from_mapping: the handler section of model-config.yaml, checked at model load."""

import pytest

from handler.core.settings import HandlerSettings, SettingsError


@pytest.mark.parametrize("values", [None, {}])
def test_nothing_given_means_the_defaults(values):
    assert HandlerSettings.from_mapping(values) == HandlerSettings()


def test_defaults_pass_their_own_check():
    HandlerSettings().check()


def test_values_given_are_used():
    settings = HandlerSettings.from_mapping({"default_steps": 25, "default_output_format": "png", "warmup": False})
    assert settings.default_steps == 25
    assert settings.default_output_format == "png"
    assert settings.warmup is False
    assert settings.max_steps == HandlerSettings().max_steps


def test_unknown_key_is_named_and_known_keys_listed():
    with pytest.raises(SettingsError) as caught:
        HandlerSettings.from_mapping({"default_stepz": 25})
    message = str(caught.value)
    assert "default_stepz" in message
    for known in ("default_steps", "max_images", "torch_threads", "warmup"):
        assert known in message


@pytest.mark.parametrize("name,value", [
    ("default_steps", "50"),
    ("default_steps", 50.0),
    ("max_images", True),
    ("warmup", "yes"),
    ("warmup", 1),
    ("default_guidance_scale", "7.5"),
    ("default_output_format", None),
])
def test_wrong_type_is_an_error(name, value):
    with pytest.raises(SettingsError) as caught:
        HandlerSettings.from_mapping({name: value})
    assert name in str(caught.value)
    assert repr(value) in str(caught.value)


def test_int_for_a_float_setting_is_accepted():
    settings = HandlerSettings.from_mapping({"default_guidance_scale": 7, "default_strength": 1})
    assert settings.default_guidance_scale == 7.0
    assert type(settings.default_guidance_scale) is float
    assert type(settings.default_strength) is float


def test_bool_for_a_float_setting_is_an_error():
    with pytest.raises(SettingsError, match="default_guidance_scale"):
        HandlerSettings.from_mapping({"default_guidance_scale": True})


@pytest.mark.parametrize("name", ["default_width", "default_height"])
def test_default_side_not_multiple_of_8(name):
    with pytest.raises(SettingsError, match=name) as caught:
        HandlerSettings.from_mapping({name: 700})
    assert "700" in str(caught.value)


def test_default_side_outside_min_and_max():
    with pytest.raises(SettingsError, match="default_width"):
        HandlerSettings.from_mapping({"default_width": 512, "max_side": 256, "default_height": 256})


def test_max_request_pixels_over_max_batch_pixels():
    with pytest.raises(SettingsError, match="max_request_pixels"):
        HandlerSettings.from_mapping({"max_request_pixels": 4 * 768 * 768 + 1})


def test_max_request_pixels_equal_to_max_batch_pixels_is_fine():
    settings = HandlerSettings.from_mapping({"max_request_pixels": 1024 * 1024, "max_batch_pixels": 1024 * 1024})
    assert settings.max_request_pixels == settings.max_batch_pixels


@pytest.mark.parametrize("values,named", [
    ({"default_output_format": "gif"}, "default_output_format"),
    ({"device": "tpu"}, "device"),
    ({"dtype": "float64"}, "dtype"),
    ({"default_steps": 200}, "default_steps"),
    ({"max_images": 0}, "max_images"),
    ({"default_strength": 0.0}, "default_strength"),
    ({"torch_threads": -1}, "torch_threads"),
    ({"min_side": 60}, "min_side"),
    ({"max_pixels": 512 * 512}, "default_width x default_height"),
])
def test_out_of_range_values(values, named):
    with pytest.raises(SettingsError, match=named):
        HandlerSettings.from_mapping(values)
