"""The JSON Schema a model serves and the parser that model runs agree, for every family.

Bodies are generated from each family's ``Contract.json_schema()`` by hypothesis-jsonschema and sent through
the native protocol (``read_native``) as JSON bytes. Every schema-valid body must parse, or be refused only
by one of the documented cross-field rules (``CROSS_FIELD_RULES``, which a JSON Schema cannot state). The
converse holds on a sample: a body the parser accepts validates against the schema.

Two things the schema cannot carry are supplied by the test:
- an image field's value: the schema says "a base64 string", not "a decodable PNG", so every generated
  ``image``/``mask_image`` string is replaced by a real small base64 PNG before parsing;
- the object level: hypothesis-jsonschema 0.23.1's object strategy fails under the pinned hypothesis 6.170.15
  (``AttributeError: 'many' object has no attribute 'more'``; it runs under 6.170.0, but there it ignores
  draft 2020-12's ``dependentRequired`` and makes a mask_image without an image). So each property's values
  come from ``from_schema`` and the test composes objects from the schema's own ``required``,
  ``dependentRequired`` and ``properties``; jsonschema's validator then judges every composed body.

The served tests read the schema and capabilities from a real TorchServe's describe API and check that
explanations are refused per request, also inside a batch.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from hypothesis_jsonschema import from_schema

from handler.core.capabilities import TASKS
from handler.core.contract import CROSS_FIELD_RULES, ClientRequest, Contract
from handler.core.failures import INVALID_FIELD, Rejection
from handler.core.schedulers import DISCRETE, scheduler_names
from handler.protocols.http import status_of
from helpers import (
    batches_in, capabilities_of_family, error_of, family_contracts, log_offset, log_since, management, png_base64,
    predict, read_native, shipped_settings, solid, SMALL,
)

CONTRACTS = family_contracts()
every_contract = pytest.mark.parametrize("contract", list(CONTRACTS.values()), ids=list(CONTRACTS))
SCHEMA_SETTINGS = settings(max_examples=120, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
IMAGE = png_base64(solid(80, 72))  # sides that are multiples of 8 but not (72) of 16
MASK = png_base64(solid(80, 72, 255, mode="L"))
REAL_IMAGES = {"image": IMAGE, "mask_image": MASK, "control_image": IMAGE}


def validator(contract: Contract) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(contract.json_schema())


def property_values(contract: Contract) -> dict:
    """A hypothesis-jsonschema strategy per property of the contract's schema."""
    schema = contract.json_schema()
    return {name: object_values(subschema) if subschema.get("type") == "object" else
            from_schema({"$schema": schema["$schema"], **subschema})
            for name, subschema in schema["properties"].items()}


def object_values(schema: dict):
    """Objects with some of the schema's properties (outpaint), each drawn from its own schema:
    hypothesis-jsonschema 0.23.1 cannot draw objects under hypothesis 6.170 ('many' object has no attribute
    'more'), though it draws their scalar properties."""
    optional = {name: from_schema(subschema) for name, subschema in schema["properties"].items()}
    return st.fixed_dictionaries({}, optional=optional).filter(
        lambda value: len(value) >= schema.get("minProperties", 0))


@st.composite
def schema_bodies(draw, contract: Contract, values: dict):
    """An object the schema allows: its required fields, any optional ones, and what those depend on."""
    schema = contract.json_schema()
    chosen = set(schema["required"]) | {name for name in schema["properties"] if draw(st.booleans())}
    while True:  # what the chosen fields need, and what that needs in turn
        needed = {needed for name in chosen for needed in schema["dependentRequired"].get(name, ())}
        if needed <= chosen:
            break
        chosen |= needed
    return {name: draw(values[name]) for name in schema["properties"] if name in chosen}


def with_real_images(body: dict) -> dict:
    """The body with a real image in each image field (one per item of a list)."""
    return {name: [REAL_IMAGES[name]] * len(value) if name in REAL_IMAGES and isinstance(value, list) else
            REAL_IMAGES.get(name, value) for name, value in body.items()}


def read_json(contract: Contract, body: dict):
    """The native protocol's outcome for ``body`` sent as application/json: a ClientRequest or the Rejection."""
    try:
        return read_native(contract, {"body": json.dumps(body).encode()}, {"Content-Type": "application/json"})
    except Rejection as rejection:
        return rejection


# --- The schema itself --------------------------------------------------------------------------------------

@every_contract
def test_the_schema_is_a_valid_draft_2020_12_schema_whose_defaults_it_allows(contract):
    schema = contract.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == set(contract.fields)
    for name, subschema in schema["properties"].items():
        if "default" in subschema:
            jsonschema.Draft202012Validator(subschema).validate(subschema["default"])
    for rule in CROSS_FIELD_RULES.values():  # what the schema cannot state, its description says
        assert rule.format(**vars(contract.settings)) in schema["description"]


def test_family_differences_show_in_the_schema():
    sd1, sd3, flux = (CONTRACTS[name].json_schema()["properties"] for name in ("sd1", "sd3", "flux"))
    assert sd1["width"]["multipleOf"] == 8 and sd3["width"]["multipleOf"] == 16 == flux["height"]["multipleOf"]
    assert sd3["scheduler"]["enum"] == ["flow_match_euler"] and "ddim" in sd1["scheduler"]["enum"]
    assert "negative_prompt" in sd3 and "negative_prompt" not in flux
    assert not {"image", "mask_image", "strength"} & set(CONTRACTS["sd1-text-to-image-only"].json_schema()["properties"])


# --- Schema-valid bodies parse (or break only a documented cross-field rule) ---------------------------------

@every_contract
def test_every_schema_valid_body_parses_or_breaks_only_a_cross_field_rule(contract):
    check = validator(contract)
    values = property_values(contract)

    @SCHEMA_SETTINGS
    @given(body=schema_bodies(contract, values))
    def property(body):
        check.validate(body)  # the composed object is schema-valid by jsonschema's own reading
        outcome = read_json(contract, with_real_images(body))
        if isinstance(outcome, ClientRequest):
            event(f"parsed {outcome.generation.task}")
            return
        event(f"refused by the {outcome.field} rule")
        assert outcome.reason == INVALID_FIELD and outcome.field in CROSS_FIELD_RULES, outcome
        assert status_of(outcome) == 400

    property()


# --- Bodies the parser accepts are schema-valid ----------------------------------------------------------------

# Values a lenient parser might let through although the schema forbids them: numbers as text, integers as
# floats, booleans, containers, out-of-range numbers, and null.
near_misses = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(), st.integers(0, 200).map(float), st.booleans(),
    st.text(max_size=8), st.integers(0, 200).map(str), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1), st.sampled_from([IMAGE, MASK, "", " "]),
    st.none(),
)


@st.composite
def lenient_bodies(draw, contract: Contract, values: dict):
    """A schema-valid body with up to two fields (rarely an unknown one) set to a near miss."""
    body = draw(schema_bodies(contract, values))
    names = list(contract.json_schema()["properties"])
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(names * 8 + ["steps", "Prompt"]))
        body[name] = draw(near_misses)
    return with_real_images(body)


@every_contract
def test_bodies_the_parser_accepts_validate_against_the_schema(contract):
    check = validator(contract)
    values = property_values(contract)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=lenient_bodies(contract, values))
    def property(body):
        outcome = read_json(contract, body)
        event("accepted" if isinstance(outcome, ClientRequest) else f"refused: {outcome.reason}")
        if isinstance(outcome, ClientRequest):
            errors = [error.message[:120] for error in check.iter_errors(body)]
            assert not errors, errors

    property()


@pytest.mark.parametrize("body", [{"prompt": "a cat\x00"}, {"prompt": "a cat \udc00"}, {"prompt": "\x00"},
                                  {"prompt": "a cat", "seed": None}, {"prompt": "a cat", "scheduler": None}],
                         ids=["nul-in-prompt", "lone-surrogate", "only-nul", "null-seed", "null-choice"])
def test_schema_and_parser_agree_on_the_edge_cases(body):
    """NUL characters, lone surrogates and nulls (refused: leave a field out instead): once disagreements the
    schema tests found, now fixed."""
    contract = CONTRACTS["sd1"]
    assert validator(contract).is_valid(body) == isinstance(read_json(contract, body), ClientRequest)


# --- What a served model describes ------------------------------------------------------------------------------

@pytest.mark.serving
def test_the_served_schema_and_capabilities_are_the_contracts(torchserve):
    response = management(torchserve, "GET", "/models/stable_diffusion?customized=true")
    assert response.status_code == 200, response.text[:300]
    (description,) = response.json()
    metadata = description["customizedMetadata"]
    # The handler returns a JSON string; TorchServe 0.12 parses it and serves an object.
    assert isinstance(metadata, dict), type(metadata)
    capabilities = metadata["capabilities"]
    assert capabilities["tasks"] == list(TASKS)
    assert capabilities["schedulers"] == list(scheduler_names(DISCRETE))
    assert capabilities["size_multiple"] == 8 and capabilities["negative_prompt"] is True
    assert capabilities["default_width"] == 768 == capabilities["default_height"]
    assert capabilities["pipeline_class"] == "StableDiffusionPipeline"
    expected = Contract(shipped_settings(), capabilities_of_family("sd1")).json_schema()
    assert metadata["request_schema"] == json.loads(json.dumps(expected))
    jsonschema.Draft202012Validator.check_schema(metadata["request_schema"])


@pytest.mark.serving
def test_explanations_get_a_501_with_a_json_error_and_the_worker_keeps_serving(torchserve):
    pids = torchserve.worker_pids("stable_diffusion")
    for sent in ({"body": {"prompt": "a cat", **SMALL}},
                 {"data": b"a cat", "headers": {"Content-Type": "text/plain"}}):
        response = predict(torchserve, route="explanations", **sent)
        assert response.status_code == 501, response.text[:300]
        error = error_of(response)
        assert error["reason"] == "not_implemented" and "/predictions/" in error["message"]
    assert predict(torchserve, {"prompt": "a cat", **SMALL}).status_code == 200
    assert torchserve.worker_pids("stable_diffusion") == pids


EXPLAINED_ROUNDS = 8


@pytest.mark.serving
def test_an_explanation_never_fails_the_predictions_batched_with_it(batched_server):
    """TorchServe forms the batches; rounds are repeated until the worker log shows an explanation that shared
    its handler call with predictions. In every round each request gets its own answer."""
    offset = log_offset(batched_server)
    predictions = [{"prompt": "a cat", "seed": seed, **SMALL, "output_format": "json"} for seed in (11, 12, 13)]
    explanation = {"prompt": "a cat", **SMALL}
    shared = []
    for round_number in range(EXPLAINED_ROUNDS):
        jobs = [("explanations", explanation)] + [("predictions", body) for body in predictions]
        if round_number % 2:  # submit the explanation last in odd rounds, to vary its place in the batch
            jobs.reverse()
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: predict(batched_server, job[1], route=job[0]), jobs))
        for (route, body), reply in zip(jobs, replies):
            if route == "explanations":
                assert reply.status_code == 501 and error_of(reply)["reason"] == "not_implemented"
            else:
                assert reply.status_code == 200, reply.text[:300]
                assert reply.json()["seeds"] == [body["seed"]]
        shared = [batch for batch in batches_in(log_since(batched_server, offset))
                  if batch.generating >= 1 and any("explanations" in line for line in batch.rejections)]
        if shared:
            break
    assert shared, f"no explanation shared a handler call with predictions in {EXPLAINED_ROUNDS} rounds"
