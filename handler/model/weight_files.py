"""Which weight files a model may use: safetensors whose header is checked before any tensor is read; never
pickles.

A pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) runs code while it loads: unpickling calls whatever the file
names. ``torch.load(weights_only=True)`` was meant to stop that, and CVE-2025-32434 (torch < 2.6) showed a file
that ran code through it anyway. So no file of these kinds is ever opened here; the refusal says how to convert
it on a machine the operator trusts.

A ``.safetensors`` file is 8 bytes of header length, a JSON header naming each tensor's dtype, shape and byte
range, then the bytes. Its header is read here with a bound on its size and checked against the file: every
range inside the data, ranges back to back without gaps or overlaps, each as long as its dtype and shape say.
A malformed, oversized or lying header is refused before a loader maps a single tensor.
"""

import json
import math
import struct
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound; real headers are a few MB at most
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
CONVERSION_HINT = (
    "Convert it to .safetensors on a machine you trust (one where running the file's code would do no harm, "
    "e.g. a throw-away container without credentials), for example:\n"
    "  python -c \"import sys, torch, safetensors.torch as st; d = torch.load(sys.argv[1], map_location='cpu', "
    "weights_only=True); d = d.get('state_dict', d); st.save_file({k: v.contiguous() for k, v in d.items() "
    "if isinstance(v, torch.Tensor)}, sys.argv[2])\" IN.ckpt OUT.safetensors\n"
    "or download the .safetensors version most model pages offer beside the pickle."
)


class WeightFileError(ValueError):
    """A weight file that is refused before it is loaded; the message names the file and why."""


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: Path, what: str) -> None:
    """Raise WeightFileError if ``path`` is a pickle, without opening it."""
    if is_pickle(path):
        raise WeightFileError(
            f"{what}: refusing {path}: a {Path(path).suffix} file is a Python pickle, and loading a pickle runs "
            "arbitrary code from the file (torch's weights_only guard was bypassed too, CVE-2025-32434). Only "
            f".safetensors weights are used.\n{CONVERSION_HINT}")


def read_header(path: Path, what: str = "weights") -> dict:
    """The checked header of a .safetensors file: tensor name -> {dtype, shape, data_offsets}; ``__metadata__``
    dropped. Raises WeightFileError naming the first lie found."""
    path = Path(path)
    refuse_pickle(path, what)
    where = f"{what}: {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise WeightFileError(f"{where} is not a safetensors file: shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise WeightFileError(f"{where} is not a valid safetensors file: its header claims {length} bytes, "
                                      f"more than the {MAX_HEADER_BYTES} allowed")
            if 8 + length > size:
                raise WeightFileError(f"{where} is not a valid safetensors file: its header claims {length} bytes "
                                      f"but the file holds {size - 8} after the length")
            raw = handle.read(length)
    except OSError as error:
        raise WeightFileError(f"{where} cannot be read: {error}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise WeightFileError(f"{where} is not a valid safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{where} is not a valid safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise WeightFileError(f"{where} is not a valid safetensors file: __metadata__ must map names to strings")
    _check_ranges(header, size - 8 - length, where)
    return header


def _check_ranges(header: dict, data_bytes: int, where: str) -> None:
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WeightFileError(f"{where}: tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise WeightFileError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(side) is int and side >= 0 for side in shape):
            raise WeightFileError(f"{where}: tensor {name!r} has shape {shape!r}; expected non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(value) is int for value in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise WeightFileError(f"{where}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise WeightFileError(f"{where}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes but its "
                                  f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        ranges.append((offsets[0], offsets[1], name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise WeightFileError(f"{where}: tensor {name!r} starts at byte {begin}, which {problem} (expected "
                                  f"{position})")
        position = end
    if position != data_bytes:
        raise WeightFileError(f"{where}: the tensors' data ends at byte {position} but the file holds {data_bytes} "
                              "bytes of data (truncated, or bytes the header does not account for)")


def check_safetensors(path: Path, what: str = "weights") -> dict:
    """Refuse a pickle or a .safetensors file with a bad header; the header of a good one. Anything else with
    another suffix is refused too: only safetensors carry weights here."""
    path = Path(path)
    refuse_pickle(path, what)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise WeightFileError(f"{what}: {path} is not a {SAFETENSORS_SUFFIX} file")
    return read_header(path, what)


def check_weights_in(folder: Path, what: str) -> None:
    """Every weight file under ``folder`` checked: pickles refused, safetensors headers verified."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            refuse_pickle(path, what)
            if path.suffix.lower() == SAFETENSORS_SUFFIX:
                read_header(path, what)
