"""The documentation site builds strictly: a broken link, a missing anchor or a page left out of nav fails."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_mkdocs_builds_the_site_strictly(tmp_path):
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "site" / "api.html").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: check\nnav:\n  - Home: index.md\n")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert build.returncode != 0 and "missing.md" in build.stderr
