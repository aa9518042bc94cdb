"""KServe's two protocols: the Open Inference Protocol (v2, ``/v2/models/{model}/infer``) and v1 (``:predict``).

TorchServe passes ``POST /v2/models/{model}/infer`` and ``POST /v1/models/{model}:predict`` to the handler with
the body as sent and, unlike ``/predictions/{model}``, without a ``url_path`` header (the native route always
sets one, empty when nothing follows the model). ``handler/protocols/routing.py`` sends a request without
``url_path`` here when its body is an OIP request (``inputs``, or the binary extension's
``Inference-Header-Content-Length`` header) or a v1 request (``instances``). TorchServe's own KServe envelopes are
not used: they are global to the server and read only the first request of a batch. Here every request of a
batch is read and answered in its own protocol, and they share pipeline calls like any other requests.

v2: each input tensor (one element, shape ``[1]``) or request ``parameters`` entry is a contract field under
its own name: ``prompt`` (BYTES), ``seed`` (INT64), ``num_inference_steps`` (INT32 or INT64), ... The answer
has the output ``image`` (UINT8 ``[N, H, W, 3]``; with ``parameters.output_format`` png, jpeg or webp: BYTES
``[N]`` holding base64 files) and ``seeds`` (INT64 ``[N]``), in JSON or in the binary tensor extension that
tritonclient asks for by default. v1: each instance is a body of the contract; predictions are
``{"image": <base64 file>, "seed": ...}``, one per instance. Errors are ``{"error": <message>}`` (what OIP
clients read) plus ``reason`` and ``field``, with the status every protocol gives (``handler/protocols/http.py``).
"""

import base64
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from handler.core.contract import (
    Boolean, Borders, Choice, ClientRequest, Contract, GenerationRequest, ImageInput, Integer, LoraList, Number,
    OneOrMany, Text, json_text,
)
from handler.core.encoding import SINGLE_IMAGE_FORMATS, array_json, image_file
from handler.core.failures import (
    INVALID_BODY, UNSUPPORTED_MEDIA_TYPE, Rejection, invalid, shown, unknown_names,
)
from handler.core.generation import GenerationResult
from handler.protocols.http import (
    JSON_TYPE, Call, HttpRequest, Protocol, Reply, failure_of, read_body, result_headers, status_of, utf8,
)

V1, V2 = "v1", "v2"
BINARY_HEADER = "inference-header-content-length"
BINARY_TYPE = "application/octet-stream"
EXPLAIN_HEADER = "explain"  # set by TorchServe on KServe's routes (False on infer/predict), beside no url_path
HEADER_LENGTH = re.compile(r"[0-9]{1,12}")  # str.isdigit() also takes "²", and int() refuses 5000 digits
MAX_ID_LENGTH = 256  # the v2 id is echoed in the answer: a 1 MB id must not come back as a 1 MB answer
IMAGE, SEEDS = "image", "seeds"
OUTPUTS = (IMAGE, SEEDS)
DEFAULT_V1_FORMAT = "png"
# The contract format asked for on these protocols' behalf: it holds any number of images (encoded here).
CONTRACT_FORMAT = "json"
# Contract fields these protocols cannot honour: they answer one document, never a stream.
NOT_OFFERED = ("stream", "preview_every")
INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
FLOAT_TYPES = ("FP16", "FP32", "FP64")
NUMPY_TYPE = {"INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1", "UINT16": "<u2",
              "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BOOL": "?"}


@dataclass(kw_only=True)
class KServeCall(Call):
    """One KServe request: its protocol, what to generate, and how to answer.

    ``parsed``: one per v2 request, one per v1 instance. ``formats``: per request, the file format of its
    images (None: v2's UINT8 tensor).
    """

    protocol: str = V2
    parsed: tuple[ClientRequest, ...] = ()
    formats: tuple[Optional[str], ...] = ()
    request_id: Optional[str] = None
    outputs: dict[str, bool] = field(default_factory=dict)  # v2: output name -> sent as binary data

    def requests(self) -> list[GenerationRequest]:
        return [request.generation for request in self.parsed]


def is_kserve(request: HttpRequest) -> bool:
    """Whether a request is KServe's: no ``url_path`` (KServe's routes set none), and TorchServe's ``explain``
    header (which KServe's routes set; then even a body that cannot be read is answered in KServe's shape), a
    binary OIP header, or a JSON body with ``inputs`` (v2) or ``instances`` (v1)."""
    if request.route is not None:
        return False
    if request.header(BINARY_HEADER) is not None or request.header(EXPLAIN_HEADER) is not None:
        return True
    try:
        body, from_form = request.fields()
    except Rejection:  # not readable at all: the native protocol says why
        return False
    return not from_form and bool({"inputs", "instances"} & body.keys())


class KServeProtocol(Protocol):
    """KServe v1 and v2 for one loaded model."""

    call_type = KServeCall

    # -- reading --

    def read(self, request: HttpRequest) -> KServeCall:
        """A KServe request (``is_kserve``) -> a KServeCall; raises Rejection."""
        header_length = request.header(BINARY_HEADER)
        if header_length is not None:
            protocol, (body, binary) = V2, self._split_binary(request, header_length)
        else:
            (body, from_form), binary = request.fields(), b""
            if from_form or not {"inputs", "instances"} & body.keys():
                raise invalid("inputs", "a KServe request is a JSON object with inputs (v2: {\"inputs\": [{\"name\": "
                              "\"prompt\", \"shape\": [1], \"datatype\": \"BYTES\", \"data\": [\"a cat\"]}]}) or "
                              "instances (v1: {\"instances\": [{\"prompt\": \"a cat\"}]})", reason=INVALID_BODY)
            protocol = V2 if "inputs" in body else V1
        request.refuse_explanations(
            f"use {'/v2/models/{model}/infer' if protocol == V2 else '/v1/models/{model}:predict'}")
        if protocol == V2:
            return self._read_v2(body, binary, body.get("id") if isinstance(body.get("id"), str) else None)
        return self._read_v1(body)

    def _split_binary(self, request: HttpRequest, header_length: str) -> tuple[dict, bytes]:
        """The binary tensor extension: a JSON header of the given length, then the tensors' bytes."""
        encoding = (request.header("content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise Rejection(UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {shown(encoding)} is not read here; send "
                            "the request uncompressed")
        row = request.row
        payload = bytes(row.get("body", row.get("data", b"")) or b"")
        if not HEADER_LENGTH.fullmatch(header_length.strip()) or int(header_length) > len(payload):
            raise Rejection(INVALID_BODY, f"Inference-Header-Content-Length {shown(header_length)} must be the "
                            f"length of the JSON header, at most the body's {len(payload)} bytes")
        length = int(header_length)
        body, _ = read_body({"body": payload[:length]}, JSON_TYPE)
        return body, payload[length:]

    def _read_v2(self, body: dict, binary: bytes, request_id: Optional[str]) -> KServeCall:
        known = {"id", "inputs", "outputs", "parameters"}
        extra = [key for key in body if key not in known]
        if extra:
            raise unknown_names(extra, "key", f" in the inference request; it takes {sorted(known)}")
        if "id" in body and (not isinstance(body["id"], str) or len(body["id"]) > MAX_ID_LENGTH):
            raise invalid("id", f"id must be a string of at most {MAX_ID_LENGTH} characters (it is echoed in the "
                          f"answer), got {shown(body['id'])}", reason=INVALID_BODY)
        parameters = _object(body, "parameters")
        format_name = parameters.pop("output_format", None)
        if format_name is not None and format_name not in SINGLE_IMAGE_FORMATS:
            raise invalid("output_format", f"parameters.output_format must be one of {list(SINGLE_IMAGE_FORMATS)} "
                          f"(BYTES: base64 files), or left out (UINT8 [N, H, W, 3]); got {shown(format_name)}")
        binary_default = parameters.pop("binary_data_output", False)
        if not isinstance(binary_default, bool):
            raise invalid("binary_data_output", f"parameters.binary_data_output must be true or false, got "
                          f"{shown(binary_default)}")
        fields = {name: self._json_field(name, value) for name, value in parameters.items()}
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise invalid("inputs", "inputs must be a non-empty list of tensors such as {\"name\": \"prompt\", "
                          "\"shape\": [1], \"datatype\": \"BYTES\", \"data\": [\"a cat\"]}", reason=INVALID_BODY)
        offset = 0
        for tensor in inputs:
            name, value, offset = self._input_value(tensor, binary, offset)
            if name in fields:
                raise invalid(name, f"{name} is given twice (as an input and as a parameter, or as two inputs); "
                              "give it once")
            fields[name] = value
        if offset != len(binary):
            raise invalid("inputs", f"the body has {len(binary) - offset} bytes of binary data that no input's "
                          "binary_data_size accounts for", reason=INVALID_BODY)
        outputs = self._requested_outputs(body.get("outputs"), binary_default)
        return KServeCall(protocol=V2, parsed=(self._parse(fields),), formats=(format_name,), request_id=request_id,
                          outputs=outputs)

    def _input_value(self, tensor, binary: bytes, offset: int) -> tuple[str, Any, int]:
        """One input tensor -> (its field name, its one value as the contract reads it, the new binary offset)."""
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise invalid("inputs", f"each input must be an object with a name, shape, datatype and data; got "
                          f"{shown(tensor)}", reason=INVALID_BODY)
        name = tensor["name"]
        spec = self.contract.declared.get(name)
        if spec is None:
            raise unknown_names([name], "input", "; inputs and parameters take the contract's fields: "
                                f"{[n for n in self.contract.fields if n not in NOT_OFFERED]}")
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        allowed = _datatypes_of(spec.type)
        if datatype not in allowed:
            raise invalid(name, f"input {name} must have datatype {' or '.join(allowed)}, got {shown(datatype)}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise invalid(name, f"input {name} needs a shape: a list of sizes such as [1], got {shown(shape)}")
        if math.prod(shape) != 1:
            raise invalid(name, f"input {name} must hold one element (shape [1]), got shape {shape}: one request "
                          "makes one generation (num_images for several images); send several requests, which "
                          "the server batches")
        size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor.get("parameters"),
                                                                                        dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(name, f"input {name}'s binary_data_size {shown(size)} runs past the body's "
                              f"{len(binary)} bytes of binary data", reason=INVALID_BODY)
            value = _binary_element(name, datatype, binary[offset:offset + size])
            offset += size
        else:
            data = tensor.get("data")
            while isinstance(data, list) and len(data) == 1:  # OIP data may be nested like the shape
                data = data[0]
            if data is None or isinstance(data, list):
                raise invalid(name, f"input {name} must carry its one element in data, e.g. \"data\": [...]; got "
                              f"{shown(tensor.get('data'))}")
            value = data
        item_type = spec.type.item if isinstance(spec.type, OneOrMany) else spec.type
        if isinstance(item_type, ImageInput) and isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")  # a file sent as raw BYTES
        elif isinstance(value, bytes):
            value = utf8(value, f"input {name}", name)
        return name, self._json_field(name, value), offset

    def _json_field(self, name: str, value):
        """A list or object field (loras, outpaint) given as a BYTES element or a string parameter: its JSON text,
        parsed."""
        spec = self.contract.declared.get(name)
        if spec is None or not isinstance(spec.type, tuple(JSON_TEXT_EXAMPLES)) or not isinstance(value, str):
            return value
        return json_text(name, value, f"JSON text such as {JSON_TEXT_EXAMPLES[type(spec.type)]}")

    def _requested_outputs(self, outputs, binary_default: bool) -> dict[str, bool]:
        if outputs is None:
            return {name: binary_default for name in OUTPUTS}
        if not isinstance(outputs, list) or not outputs or \
                not all(isinstance(o, dict) and o.get("name") in OUTPUTS for o in outputs):
            raise invalid("outputs", f"outputs must list some of {list(OUTPUTS)} as {{\"name\": ...}}, got "
                          f"{shown(outputs)}", reason=INVALID_BODY)
        requested = {}
        for output in outputs:
            parameters = output.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise invalid("outputs", f"the parameters of output {output['name']} must be an object such as "
                              f"{{\"binary_data\": true}}, got {shown(parameters)}", reason=INVALID_BODY)
            flag = parameters.get("binary_data", binary_default)
            if not isinstance(flag, bool):
                raise invalid("outputs", f"binary_data of output {output['name']} must be true or false, got "
                              f"{shown(flag)}")
            requested[output["name"]] = flag
        return requested

    def _read_v1(self, body: dict) -> KServeCall:
        extra = [key for key in body if key != "instances"]
        if extra:
            raise unknown_names(extra, "key", "; a v1 request is {\"instances\": [{\"prompt\": ...}, ...]}")
        instances = body["instances"]
        settings = self.contract.settings
        if not isinstance(instances, list) or not instances:
            raise invalid("instances", "instances must be a non-empty list of objects like {\"prompt\": ...}",
                          reason=INVALID_BODY)
        if len(instances) > settings.max_images:
            raise invalid("instances", f"instances has {len(instances)} entries; at most {settings.max_images} "
                          "(max_images) per request")
        requests, formats = [], []
        for index, instance in enumerate(instances):
            try:
                if not isinstance(instance, dict):
                    raise invalid(None, f"must be an object like {{\"prompt\": ...}}, got {shown(instance)}",
                                  reason=INVALID_BODY)
                fields = dict(instance)
                if "num_images" in fields:
                    raise invalid("num_images", "num_images is not taken here: each instance makes one image; "
                                  "send one instance per image (each with its own seed)")
                image_format = fields.pop("output_format", DEFAULT_V1_FORMAT)
                if image_format not in SINGLE_IMAGE_FORMATS:
                    raise invalid("output_format", f"output_format must be one of {list(SINGLE_IMAGE_FORMATS)} "
                                  f"(the file in image), got {shown(image_format)}")
                requests.append(self._parse(fields))
                formats.append(image_format)
            except Rejection as rejection:
                where = f"instances[{index}]"
                raise Rejection(rejection.reason, f"{where}: {rejection.message}",
                                f"{where}.{rejection.field}" if rejection.field else where) from None
        pixels = sum(request.generation.pixels for request in requests)
        if pixels > settings.max_request_pixels:
            raise invalid("instances", f"the instances' images have {pixels} pixels together; at most "
                          f"{settings.max_request_pixels} per request (max_request_pixels)")
        return KServeCall(protocol=V1, parsed=tuple(requests), formats=tuple(formats))

    def _parse(self, fields: dict) -> ClientRequest:
        for name in NOT_OFFERED:
            if name in fields:
                raise invalid(name, f"{name} is not offered through KServe's protocols (they answer one "
                              "document); use POST /predictions/{model} with \"stream\": true for progress")
        if "output_format" in fields:
            raise invalid("output_format", "output_format is a request parameter here: parameters.output_format")
        return self.contract.parse({**fields, "output_format": CONTRACT_FORMAT})

    # -- answers --

    def respond(self, call: KServeCall, outcomes: list) -> Reply:
        """The answer to one call, from the engine's outcomes for its requests (GenerationResults or Rejections)."""
        failure = failure_of(call, outcomes)
        if failure is not None:
            return error_reply(failure)
        if call.protocol == V1:
            predictions = [{"image": base64.b64encode(image_file(outcome.images[0], image_format,
                                                                 outcome.parameters(), outcome.request.seeds[0]))
                            .decode("ascii"), "seed": outcome.request.seeds[0]}
                           for outcome, image_format in zip(outcomes, call.formats)]
            return Reply(200, json.dumps({"predictions": predictions}).encode())
        return self._v2_reply(call, outcomes[0], call.formats[0])

    def _v2_reply(self, call: KServeCall, outcome: GenerationResult, image_format: Optional[str]) -> Reply:
        seeds = np.array(outcome.request.seeds, dtype="<i8")
        if image_format is None:
            image = Tensor(IMAGE, "UINT8", list(outcome.images.shape), outcome.images)
        else:
            parameters = outcome.parameters()
            files = [base64.b64encode(image_file(image, image_format, parameters, seed))
                     for image, seed in zip(outcome.images, outcome.request.seeds)]
            image = Tensor(IMAGE, "BYTES", [len(files)], files)
        tensors = [tensor for tensor in (image, Tensor(SEEDS, "INT64", [len(seeds)], seeds))
                   if tensor.name in call.outputs]
        document = {"model_name": self.model.name, "outputs": []}
        if self.model.version:
            document["model_version"] = self.model.version
        if call.request_id is not None:
            document["id"] = call.request_id
        chunks, placeholders = [], {}
        for tensor in tensors:
            entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
            if call.outputs[tensor.name]:
                raw = tensor.binary()
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                placeholders[tensor.name] = tensor.json_data()
                entry["data"] = f"@{tensor.name}@"
            document["outputs"].append(entry)
        header = json.dumps(document, separators=(",", ":")).encode()
        for name, data in placeholders.items():  # a flat image list is written vectorised, not by json.dumps
            header = header.replace(f"\"@{name}@\"".encode(), data, 1)
        headers = result_headers(list(outcome.request.seeds), outcome.nsfw)
        if not chunks:
            return Reply(200, header, headers)
        headers["Inference-Header-Content-Length"] = str(len(header))
        return Reply(200, header + b"".join(chunks), headers, BINARY_TYPE)


@dataclass(frozen=True)
class Tensor:
    """One output tensor: its values as a numpy array (numbers) or a list of bytes (BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    values: Any

    def binary(self) -> bytes:
        if self.datatype == "BYTES":  # each element: its length as 4 bytes little-endian, then the bytes
            return b"".join(struct.pack("<I", len(item)) + item for item in self.values)
        return np.ascontiguousarray(self.values, dtype=NUMPY_TYPE[self.datatype]).tobytes()

    def json_data(self) -> bytes:
        if self.datatype == "BYTES":
            return json.dumps([item.decode("ascii") for item in self.values]).encode()
        if self.datatype == "UINT8":
            return array_json(np.ascontiguousarray(self.values).reshape(-1))
        return json.dumps(np.asarray(self.values).reshape(-1).tolist()).encode()


def error_reply(rejection: Rejection) -> Reply:
    """``{"error": <message>, "reason", "field"}``: OIP clients (tritonclient) show ``error`` as the message."""
    return Reply(status_of(rejection), json.dumps({"error": rejection.message, "reason": rejection.reason,
                                                  "field": rejection.field}).encode(), failure=rejection)


def _object(body: dict, key: str) -> dict:
    value = body.get(key, {})
    if not isinstance(value, dict):
        raise invalid(key, f"{key} must be an object, got {shown(value)}", reason=INVALID_BODY)
    return dict(value)


# The fields a tensor or parameter carries as JSON text, with an example for the message.
JSON_TEXT_EXAMPLES = {LoraList: '[{"name": "style", "scale": 0.8}]', Borders: '{"left": 64, "right": 64}'}


def _datatypes_of(field_type) -> tuple[str, ...]:
    if isinstance(field_type, OneOrMany):  # one element per tensor: one of its items
        return _datatypes_of(field_type.item)
    if isinstance(field_type, Integer):
        return INTEGER_TYPES
    if isinstance(field_type, Number):
        return FLOAT_TYPES + INTEGER_TYPES
    if isinstance(field_type, Boolean):
        return ("BOOL",)
    if isinstance(field_type, (Text, Choice, ImageInput, LoraList, Borders)):  # loras, outpaint: JSON text
        return ("BYTES",)
    raise TypeError(f"no OIP datatype for {type(field_type).__name__}")


def _binary_element(name: str, datatype: str, raw: bytes):
    """The one element of a binary input tensor."""
    if datatype == "BYTES":
        if len(raw) < 4 or struct.unpack("<I", raw[:4])[0] != len(raw) - 4:
            raise invalid(name, f"input {name}'s binary BYTES must be one element: a 4-byte little-endian length, "
                          "then that many bytes", reason=INVALID_BODY)
        return raw[4:]
    dtype = np.dtype(NUMPY_TYPE[datatype])
    if len(raw) != dtype.itemsize:
        raise invalid(name, f"input {name} holds {len(raw)} bytes; one {datatype} is {dtype.itemsize}",
                      reason=INVALID_BODY)
    value = np.frombuffer(raw, dtype=dtype)[0]
    return bool(value) if datatype == "BOOL" else value.item()


