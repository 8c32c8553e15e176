"""docs/install.md installs everything the deployed files point at: the
systemd unit's Documentation= is a file the install steps put there, and
node.toml, which the unit runs with, is said where to come from."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _install_steps() -> str:
    doc = (ROOT / "docs/install.md").read_text()
    steps = re.search(r"## Install\n.*?```sh\n(.*?)```", doc, re.S)
    assert steps, "docs/install.md has no install block"
    return steps.group(1)


def test_the_units_documentation_is_a_file_the_install_puts_there() -> None:
    unit = (ROOT / "deploy/systemd/relay.service").read_text()
    docs = re.findall(r"^Documentation=(.*)$", unit, re.M)
    assert docs
    steps = _install_steps()
    for uri in " ".join(docs).split():
        assert uri.startswith(("file://", "https://", "man:")), uri
        if uri.startswith("file://"):
            path = uri.removeprefix("file://")
            source = re.search(rf"install .*?(\S+) {re.escape(path)}(\s+#.*)?$", steps, re.M)
            assert source, f"{path} (the unit's Documentation=) is installed by no step of docs/install.md"
            assert (ROOT / source.group(1)).is_file(), source.group(0)


def test_the_install_says_where_node_toml_comes_from() -> None:
    doc = (ROOT / "docs/install.md").read_text()
    steps = _install_steps()
    assert "node.toml" in steps
    before = doc[:doc.index("## Install")] + doc[doc.index("## Install"):].split("```sh")[0]
    assert "node.toml" in before and "README" in before, "write node.toml from what? the doc does not say"
