"""The shipped config.properties is secure as it stands: a test of the file, not of a copy."""

from urllib.parse import urlparse

from conftest import REPO_ROOT
from harness.local_server import read_properties

PROPERTIES = read_properties(REPO_ROOT / "config.properties")


def test_every_listener_is_on_loopback():
    for key in ("inference_address", "management_address", "metrics_address"):
        assert urlparse(PROPERTIES[key]).hostname == "127.0.0.1", key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert PROPERTIES[key] == "127.0.0.1", key


def test_token_authorization_is_on_and_the_model_api_off():
    assert PROPERTIES.get("disable_token_authorization", "false") == "false"
    assert PROPERTIES.get("enable_model_api", "false") == "false"


def test_model_urls_are_limited_to_the_local_model_store():
    allowed = PROPERTIES["allowed_urls"]
    assert "http" not in allowed and "model_store" in allowed


def test_size_limits_are_set_on_purpose():
    # The largest `array` response: 4 images of 1024x1024 at up to 14 bytes a pixel, plus brackets.
    largest_array = 4 * 1024 * 1024 * 14 + 4 * 1024 * 2 + 16
    assert largest_array <= int(PROPERTIES["max_response_size"]) <= 128 * 1024 * 1024
    assert 16 * 1024 * 1024 <= int(PROPERTIES["max_request_size"]) <= 64 * 1024 * 1024
