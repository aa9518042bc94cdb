"""The docs' tables are the contract users read: generated from the code, and checked against it."""

import re
import subprocess
import sys

import yaml

from conftest import REPO_ROOT
from handler.core.failures import REASONS
from handler.core.settings import HandlerSettings
from handler.protocols.http import STATUS_OF_REASON

README = (REPO_ROOT / "README.md").read_text()
DOCS = REPO_ROOT / "docs"


def table_rows(page: str, heading: str) -> dict[str, list[str]]:
    """The first table under ``heading`` of docs/``page``: first cell (without backticks) -> the other cells."""
    section = (DOCS / page).read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= set("- ") and cells[0] not in ("field", "setting", "format"):
            rows.setdefault(cells[0].strip("`"), cells[1:])
        elif rows and not line.startswith("|"):
            break
    return rows


def test_generated_tables_are_the_code_declarations():
    check = subprocess.run([sys.executable, "scripts/gen_docs_tables.py", "--check"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_failure_kind_and_its_status_is_documented():
    errors = (DOCS / "api.md").read_text().split("**Errors.**", 1)[1].split("\n\n", 2)[2]
    for reason, status in STATUS_OF_REASON.items():
        assert f"`{reason}`" in errors, reason
        statement = errors.split(f"`{reason}`")[0].rsplit(";", 1)[-1]
        assert str(status) in statement, (reason, status)
    metrics = table_rows("operations.md", "Metrics")["RejectedRequests"][-1]
    assert all(f"`{reason}`" in metrics for reason in REASONS)


def test_shipped_model_config_loads_and_keeps_the_design_defaults():
    config = yaml.safe_load((REPO_ROOT / "model-config.yaml").read_text())
    settings = HandlerSettings.from_mapping(config["handler"])
    assert (settings.default_steps, settings.default_guidance_scale, settings.default_width,
            settings.default_height, settings.default_output_format) == (50, 7.5, 768, 768, "array")


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci and re.search(r"^scripts/test\.sh$", README, re.MULTILINE)
