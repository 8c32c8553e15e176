"""bench/RESULTS.md is written by several benches, each owning some of its
sections: a bench replaces its own sections and keeps everyone else's."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def _blocks(text: str) -> list[str]:
    """The text cut before every line that opens with '# ' or '## '."""
    cuts = [m.start() for m in re.finditer(r"^#{1,2} ", text, flags=re.M)]
    if not cuts or cuts[0] != 0:
        cuts.insert(0, 0)
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)], strict=True) if text[a:b]]


def write_sections(md: str, owned: tuple[str, ...], top: bool = False, path: Path = RESULTS_MD) -> None:
    """Put `md` where the sections whose headings start with one of `owned`
    were (they are dropped), every other section kept in its place. With
    none of them there yet: at the top with `top`, else at the end."""
    text = path.read_text() if path.exists() else ""
    kept: list[str] = []
    at = None
    for block in _blocks(text):
        if block.lstrip().startswith(owned):
            if at is None:
                at = len(kept)
            continue
        kept.append(block.rstrip("\n") + "\n")
    if at is None:
        at = 0 if top else len(kept)
    kept.insert(at, md.rstrip("\n") + "\n")
    path.write_text("\n".join(b.rstrip("\n") + "\n" for b in kept if b.strip()))
