"""The reference docs derived from code stay in step with it."""
import re
import subprocess
import sys

from conftest import ROOT


def test_options_reference_matches_the_dataclasses():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "options_doc.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_option_of_every_family_is_in_the_reference():
    from fairseq.models import MODEL_DATACLASS_REGISTRY

    text = (ROOT / "docs" / "options.md").read_text()
    for name in ("gau_relu2_norm", "kernel_eps", "decoder_self_memory_size", "feature_map", "redraw_interval"):
        assert f"`--{name.replace('_', '-')}`" in text
    assert "memsizer_transformer" in MODEL_DATACLASS_REGISTRY


def test_readme_links_point_at_files():
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_to_a_section_name_one():
    """A link's #fragment into a markdown file names one of that file's headings."""
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target, anchor in re.findall(r"\]\(([^)#:]*\.md)#([^)]*)\)", doc.read_text()):
            path = doc.parent / target if target else doc
            anchors = {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}
            assert anchor in anchors, f"{doc.name} links to {target}#{anchor}, a section {target} does not have"
