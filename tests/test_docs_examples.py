"""Every shell and Python example of the README and docs/, run as written, in order, against a real TorchServe.

The examples are copied out of the pages' fenced blocks (```bash and ```python) into one bash session that runs
in a copy of the repository (its tracked and untracked files, with the suite's .venv), as a user would paste
them into a terminal: shell variables (``TOKEN``) carry from one block to the next, and Python blocks run with
``.venv/bin/python``. The session runs in build/docs-examples, in its own network, PID and mount namespaces (``unshare``, no root
needed): the examples' fixed ports (8080, 8081, 8090 ...) and ``/tmp`` are then its own, so it never meets
another TorchServe on this machine, and every process it started ends with it.

A block that cannot run here says why in an HTML comment on the line above it (``<!-- not run: REASON -->``,
e.g. it needs the model hub or a cluster); a curl or Python example may be skipped only where its reason names
the test or script that runs it instead (``scripts/test_image.sh runs ...``: a container build takes minutes). Two changes to
the copy, all for speed and isolation, none to the examples: ``scripts/setup.sh`` is a stub (the suite's
.venv is already set up); the copied model-config.yaml takes 10 steps by default instead of 50, so the two
generations at the defaults (the demo's and the upstream client's, 768x768) take seconds, not half a minute
each; and a docs page whose examples need the demo's server starts it, with the commands of docs/building.md,
when an earlier page stopped it.

Every example's result is checked: each file the examples write is a PNG/JPEG of the stated size (or the JSON
they describe), each block's commands all succeed, and the outputs the pages quote appear.
"""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT

pytestmark = pytest.mark.serving

# The pages in the order a reader would run them: the README's demo leaves the server running; the pages
# that rebuild the archive come after the ones that use the demo's archive.
PAGES = ["README.md", "docs/api.md", "docs/openai.md", "docs/a1111-clients.md", "docs/kserve.md",
         "docs/configuration.md", "docs/prompts.md", "docs/adapters.md", "docs/building.md", "docs/deploying.md",
         "docs/several-models.md"]
RUNNABLE = ("bash", "python")
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```\n",
                   re.MULTILINE | re.DOTALL)
# Started before a page when no server runs: the start of docs/building.md ("Starting and stopping TorchServe").
START_SERVER = """mkdir -p run
cd run
../.venv/bin/torchserve --stop --foreground   # a server started earlier with the same TMPDIR, if any
../.venv/bin/torchserve --start --ncs --ts-config ../config.properties --model-store ../model_store \\
  --models stable_diffusion=stable_diffusion.mar
cd ..
.venv/bin/python -m sdclient --wait-ready
TOKEN=$(.venv/bin/python -c 'import json; print(json.load(open("run/key_file.json"))["inference"]["key"])')
"""
DEFAULT_STEPS = ("default_steps: 50", "default_steps: 10")  # the copied model-config.yaml: see the docstring
SETUP_STUB = "#!/usr/bin/env bash\necho 'setup: (docs examples test) the suite has set up .venv already'\n"

# What the examples write: path -> (format, (width, height)) for images, or a check of the JSON document.
IMAGES = {
    "astronaut.png": ("PNG", (768, 768)),
    "out/fox.png": ("PNG", (512, 512)),
    "out/lighthouse.jpg": ("JPEG", (512, 512)),
    "out/fox-painted.png": ("PNG", (512, 512)),
    "out/fox-client.png": ("PNG", (512, 512)),
    "out/fox-client-painted.png": ("PNG", (512, 512)),
    "out/fox-stream.png": ("PNG", (256, 256)),
    "out/fox-python.png": ("PNG", (256, 256)),
    "out/fox-openai.png": ("PNG", (512, 512)),
    "out/fox-streamed.png": ("PNG", (256, 256)),
    "out/fox-wide.png": ("PNG", (768, 512)),
    "out/fox-wide-client.png": ("PNG", (768, 512)),
    "out/openai-fox-0.png": ("PNG", (256, 256)),
    "out/openai-fox-1.png": ("PNG", (256, 256)),
    "out/openai-edited.png": ("PNG", (256, 256)),
    "out/fox-v2.png": ("PNG", (256, 256)),
    "out/lighthouse-v2.png": ("PNG", (256, 256)),
    "out/lighthouse-weighted.png": ("PNG", (256, 256)),
    "out/fox-anime.png": ("PNG", (256, 256)),
    "out/fox-form.png": ("PNG", (256, 256)),
    "out/fox-anime-client.png": ("PNG", (256, 256)),
    "out/fox-edges.png": ("PNG", (256, 256)),
    "out/fox-two.png": ("PNG", (256, 256)),
    "out/fox-edges-client.png": ("PNG", (256, 256)),
    "out/lighthouse-lb.png": ("PNG", (256, 256)),
    "out/lighthouse-a1111.png": ("PNG", (64, 64)),
}
DOCUMENTS = {
    "out/astronaut.json": lambda document: np.array(document, dtype=np.uint8).shape == (768, 768, 3),
    "out/describe.json": lambda document: document["request_schema"]["required"] == ["prompt"],
    "out/openai-lighthouse.json": lambda document: len(document["data"]) == 2,
    "out/openai-edited.json": lambda document: len(document["data"]) == 1,
    "out/fox-v2.json": lambda document: document["id"] == "fox-1",
    "out/predictions.json": lambda document: [item["seed"] for item in document["predictions"]] == [1, 2],
}
# Output the pages quote: (page, a line of the block) -> text its output must hold.
QUOTED = {
    ("README.md", '-d \'{"prompt": "a red fox", "width": 770}\''): '"field": "width"',
    ("docs/api.md", "curl -N"): '"event":"result"',
    ("docs/openai.md", "from openai import OpenAI"): "['stable_diffusion']",
    ("docs/kserve.md", "TOKEN=$(python3"): "fox-1 {'name': 'seeds'",
    ("docs/kserve.md", "import tritonclient.http as triton"): "(1, 256, 256, 3) [3]",
    ("docs/prompts.md", "山上的灯塔"): "'prompt_translated'",
    ("docs/adapters.md", "watercolor"): "not a LoRA of this model; available: ['anime', 'sketch']",
    ("docs/configuration.md", "min_worker=2"): '"status": "READY"',
    ("docs/deploying.md", "multinode.sh start"): "X-Upstream: 127.0.0.1:",
    ("docs/a1111-clients.md", "import webuiapi"): "[7] a lighthouse at dusk",
    ("docs/several-models.md", "from openai import OpenAI"): "sd15 ",
    ("docs/several-models.md", "for model in client.models.list()"): "sdxl ",
}


def blocks_of(page: str) -> list[dict]:
    """The fenced blocks of a page: language, code and the reason it is not run (None: it runs)."""
    text = (REPO_ROOT / page).read_text()
    return [{"page": page, "lang": match["lang"], "code": match["code"], "reason": match["reason"],
             "line": text[:match.start("code")].count("\n")} for match in BLOCK.finditer(text)]


def runnable(block: dict) -> bool:
    return block["lang"] in RUNNABLE and block["reason"] is None


def every_page() -> list[str]:
    return ["README.md"] + sorted(f"docs/{path.name}" for path in (REPO_ROOT / "docs").glob("*.md"))


def test_every_page_with_examples_is_run_and_no_request_example_is_skipped():
    for page in every_page():
        for block in blocks_of(page):
            if block["reason"] is not None and ("curl" in block["code"] or block["lang"] == "python"):
                assert re.search(r"\b(tests|scripts)/\S+ runs\b", block["reason"]), \
                    f"{page}:{block['line']}: a curl or Python example must run, here or in a named test " \
                    f"({block['reason']})"
            if runnable(block):
                assert page in PAGES, f"{page} has examples: add it to PAGES in {Path(__file__).name}"


def workspace_names() -> list[str]:
    """The repository's files as a clone (plus work not yet committed) has them."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    return [name for name in listed if name and (REPO_ROOT / name).is_file()]


def workspace(folder: Path) -> Path:
    """A copy of the repository as a clone would have it, with the suite's .venv and a stub setup.sh."""
    for name in workspace_names():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, folder / name)
    (folder / ".venv").symlink_to((REPO_ROOT / ".venv").resolve())
    (folder / "scripts" / "setup.sh").write_text(SETUP_STUB)
    config = (folder / "model-config.yaml").read_text()
    assert DEFAULT_STEPS[0] in config, "the shipped model-config.yaml no longer says " + DEFAULT_STEPS[0]
    (folder / "model-config.yaml").write_text(config.replace(*DEFAULT_STEPS))
    return folder


def session_script(folder: Path, blocks: list[dict]) -> str:
    """One bash session: each block in turn, marked in the output, with every failing command reported."""
    lines = ["exec 2>&1", "set -o pipefail", f"cd {folder}", "ip link set lo up",
             f"mount --bind {folder / 'tmp'} /tmp", "export HF_HUB_OFFLINE=1 TMPDIR=/tmp",
             "trap 'echo \"@@failed: $BASH_COMMAND (exit $?)\"' ERR"]
    for index, block in enumerate(blocks):
        path = folder / "examples" / f"{index:03d}.{'sh' if block['lang'] == 'bash' else 'py'}"
        path.write_text(block["code"])
        lines.append(f"printf '\\n@@block {index}\\n'; SECONDS=0")
        if block["page"] != "README.md" and block is next(b for b in blocks if b["page"] == block["page"]):
            start = folder / "examples" / f"{index:03d}-start.sh"
            start.write_text(START_SERVER)
            lines.append(f"[ -f run/key_file.json ] || source {start}")
        lines.append(f"source {path}" if block["lang"] == "bash" else f".venv/bin/python {path}")
        lines.append(f"cd {folder}; printf '\\n@@took %s\\n' $SECONDS")
    lines += ["printf '\\n@@end\\n'", "scripts/multinode.sh stop >/dev/null 2>&1 || true",
              "(cd run && ../.venv/bin/torchserve --stop --foreground >/dev/null 2>&1) || true"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def session():
    """Run every example once; the output of each block, keyed by its index.

    The copy lives in build/docs-examples (ignored by git; kept until the next run, to read its session.log),
    not under /tmp: the session mounts its own folder over /tmp."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("the docs examples need unshare (util-linux) and ip (iproute2)")
    if Path("/tmp") in REPO_ROOT.resolve().parents:
        pytest.fail(f"the docs examples mount a folder of their own over /tmp, which would hide this clone "
                    f"({REPO_ROOT}): run them from a clone outside /tmp")
    folder = REPO_ROOT / "build" / "docs-examples"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    workspace(folder)
    (folder / "tmp").mkdir()
    (folder / "examples").mkdir()
    blocks = [block for page in PAGES for block in blocks_of(page) if runnable(block)]
    script = folder / "examples" / "session.sh"
    script.write_text(session_script(folder, blocks))
    started = time.monotonic()
    log = folder / "examples" / "session.log"  # written as the session runs: tail it to follow
    with log.open("w") as sink:
        # --kill-child: if this test is stopped, the namespace's first process, and with it every other, ends too
        session = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork",
                                    "--kill-child", "--mount-proc", "bash", str(script)],
                                   stdout=sink, stderr=subprocess.STDOUT)
        try:
            session.wait(timeout=3600)
        finally:
            session.kill()
    output = log.read_text()
    print(f"docs examples: {len(blocks)} blocks in {time.monotonic() - started:.0f} s; log: {log}")
    assert "@@end" in output, output[-5000:]
    parts = re.split(r"^@@block (\d+)\n", output.split("@@end")[0], flags=re.MULTILINE)
    outputs = {int(index): text for index, text in zip(parts[1::2], parts[2::2])}
    seconds = {}
    for index, text in outputs.items():
        took = re.search(r"^@@took (\d+)$", text, re.MULTILINE)
        seconds[blocks[index]["page"]] = seconds.get(blocks[index]["page"], 0) + int(took[1] if took else 0)
    print("docs examples, seconds per page:", seconds)
    return folder, blocks, outputs


def test_every_example_block_succeeds(session):
    _, blocks, outputs = session
    failed = [f"{block['page']}:{block['line']}: {re.findall(r'@@failed: .*', outputs.get(index, ''))}\n"
              f"{outputs.get(index, '(not reached)')[-1500:]}"
              for index, block in enumerate(blocks) if "@@failed" in outputs.get(index, "@@failed")]
    assert not failed, "\n\n".join(failed)
    python_failed = [f"{block['page']}:{block['line']}" for index, block in enumerate(blocks)
                     if block["lang"] == "python" and "Traceback" in outputs[index]]
    assert not python_failed, python_failed


def test_the_examples_write_the_files_they_describe(session):
    folder, _, _ = session
    for name, (image_format, size) in IMAGES.items():
        assert (folder / name).is_file(), f"{name} was not written"
        with Image.open(folder / name) as image:
            assert (image.format, image.size) == (image_format, size), name
    for name, check in DOCUMENTS.items():
        assert check(json.loads((folder / name).read_text())), name
    assert sorted(path.suffix for path in (folder / "out" / "previews").iterdir()) == [".jpg"] * 4


def test_the_quoted_outputs_appear(session):
    _, blocks, outputs = session
    for (page, line), quoted in QUOTED.items():
        matching = [index for index, block in enumerate(blocks) if block["page"] == page and line in block["code"]]
        assert len(matching) == 1, (page, line)
        assert quoted in outputs[matching[0]], (page, line, outputs[matching[0]][-2000:])


def test_the_examples_write_only_where_the_docs_say(session):
    folder, _, _ = session
    copied = {name.split("/")[0] for name in workspace_names()} | {".venv"}
    written = {path.name for path in folder.iterdir()} - copied
    assert written <= {"out", "run", "build", "astronaut.png", "tmp", "examples"}, written
