"""The generated docs match the code they are generated from."""

from pathlib import Path

from dcube.config import RunConfig, config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_config_reference_is_not_stale():
    assert (DOCS / "config.md").read_text() == config_reference() + "\n", "run: make docs"


def test_the_reference_lists_every_key_once_with_a_description():
    rows = [r for r in config_reference().splitlines() if r.startswith("| `")]
    keys = [r.split("`")[1] for r in rows]
    flat = []
    for name, value in RunConfig().to_dict().items():
        flat += [f"{name}.{k}" for k in value] if isinstance(value, dict) else [name]
    assert sorted(keys) == sorted(flat) and len(set(keys)) == len(keys)
    assert all(r.rstrip("|").rstrip().split("|")[-1].strip() for r in rows), "a key without a description"


def test_every_relative_link_of_the_docs_resolves():
    import re

    root = DOCS.parent
    pages = [root / "README.md", root / "BENCHMARKS.md", root / "CHANGELOG.md", *DOCS.rglob("*.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(root)} -> {target}")
    assert broken == []
