"""The documentation's code runs: every ```python block of README.md and docs/**/*.md.

Each block runs under the test process's backend (scripts/test_all_backends.py runs the suite once per backend),
in a fresh namespace, in a temporary working directory, from Keras's default state. An HTML comment on the line
before a block changes that:

    <!-- docs-test: continue -->                 the block continues the page's previous python block (same
                                                 namespace, run together as one test)
    <!-- docs-test: skip reason="needs a GPU" --> the block is skipped, with that reason

Blocks in other languages (bash, text, diff) are not run. Also checked here: every public name has a page in the
API reference (docs/api/), and docs/index.md is README.md with its links pointing into the site.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import textwrap
from typing import NamedTuple

import keras
import pytest

import keras_ssam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>continue|skip)(?:\s+reason=\"(?P<reason>[^\"]*)\")?\s*-->\s*$")


class Block(NamedTuple):
    page: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # "continue", "skip" or None
    reason: str | None


def pages() -> list[str]:
    """README.md and every Markdown page under docs/, relative to ROOT."""
    found = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return ["README.md"] + [os.path.relpath(p, ROOT) for p in found]


def python_blocks(page: str) -> list[Block]:
    """The ```python blocks of `page` (relative to ROOT), with the docs-test marker on the line before each."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks, lang = opening["indent"], opening["ticks"], opening["lang"]
        end = i + 1
        while end < len(lines) and not re.match(rf"^{re.escape(indent)}{re.escape(ticks)}\s*$", lines[end]):
            end += 1
        if lang == "python":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _MARKER.match(before)
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            blocks.append(Block(page, i + 1, textwrap.dedent(body) + "\n",
                                marker["what"] if marker else None, marker["reason"] if marker else None))
        i = end + 1
    return blocks


def examples() -> list[tuple[str, list[Block]]]:
    """(test id, blocks run together): a block and the blocks that continue it."""
    units = []
    for page in pages():
        for block in python_blocks(page):
            if block.marker == "continue":
                if not units or units[-1][1][0].page != page:
                    raise ValueError(f"{page}:{block.line}: `docs-test: continue` with no python block before it")
                units[-1][1].append(block)
            else:
                units.append((f"{page}:{block.line}", [block]))
    return units


@pytest.fixture
def keras_default_state(tmp_path, monkeypatch):
    """A temporary working directory and Keras's default global state, before and after."""
    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


@pytest.mark.parametrize("unit", [blocks for _, blocks in examples()], ids=[name for name, _ in examples()])
def test_code_block_runs(unit, keras_default_state):
    skipped = [b for b in unit if b.marker == "skip"]
    if skipped:
        pytest.skip(skipped[0].reason or "marked `docs-test: skip`")
    namespace = {"__name__": "__docs__"}
    for block in unit:
        # Line numbers in a traceback are the Markdown file's.
        code = compile("\n" * block.line + block.code, os.path.join(ROOT, block.page), "exec")
        exec(code, namespace)


def test_markers_parse():
    """A misspelt marker would silently run or chain the wrong block: every `docs-test` comment is well formed."""
    bad = []
    for page in pages():
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.lstrip().startswith("<!--") and "docs-test" in line and not _MARKER.match(line):
                    bad.append(f"{page}:{number}: {line.strip()}")
    assert not bad, "malformed docs-test markers:\n" + "\n".join(bad)


def test_every_public_name_has_an_api_page():
    """Each name of `keras_ssam.__all__` is rendered by a `::: keras_ssam.<name>` in docs/api/."""
    text = ""
    for path in glob.glob(os.path.join(ROOT, "docs", "api", "*.md")):
        with open(path, encoding="utf-8") as f:
            text += f.read()
    rendered = set(re.findall(r"^::: (keras_ssam[\w.]*)\s*$", text, re.M))
    missing = [name for name in keras_ssam.__all__
               if name != "__version__" and f"keras_ssam.{name}" not in rendered]
    assert not missing, f"no `::: keras_ssam.<name>` in docs/api/*.md for {missing}"
    for module in ("keras_ssam.schedules", "keras_ssam.flatness", "keras_ssam.perturb", "keras_ssam.step",
                   "keras_ssam._wrapper.ForwardingOptimizer"):
        assert module in rendered, module


def index_from_readme(readme: str) -> str:
    """docs/index.md: README.md with its links pointing into the site."""
    text = (readme.replace("](docs/guides/", "](guides/")
            .replace("](docs/architecture.md)", "](architecture.md)")
            .replace("](CHANGELOG.md)", "](changelog.md)")
            .replace("([LICENSE](LICENSE))",
                     "([LICENSE](https://github.com/keras-ssam/keras_ssam/blob/main/LICENSE))"))
    return text.replace(
        'The same pages, with the API reference generated from the docstrings, build into a site with\n'
        '`pip install -e ".[docs]" && mkdocs build --strict`.',
        "The [API reference](api/index.md) is generated from the docstrings.",
    )


def test_index_is_the_readme():
    """The site's landing page says what the README says (regenerate: python tests/test_docs.py --write-index)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        want = index_from_readme(f.read())
    with open(os.path.join(ROOT, "docs", "index.md"), encoding="utf-8") as f:
        assert f.read() == want, "docs/index.md differs from README.md: run `python tests/test_docs.py --write-index`"


def test_readme_example_is_the_first_block():
    """scripts/check_wheel.sh runs README.md's first python block: the example, with no marker."""
    first = python_blocks("README.md")[0]
    assert first.marker is None
    assert "keras_ssam.SAMModel" in first.code and ".fit(" in first.code


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-index"]:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            index = index_from_readme(f.read())
        with open(os.path.join(ROOT, "docs", "index.md"), "w", encoding="utf-8") as f:
            f.write(index)
    else:
        sys.exit("usage: python tests/test_docs.py --write-index")
