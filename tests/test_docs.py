"""The reference docs derived from code stay in step with it."""
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
    import re

    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
