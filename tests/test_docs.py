"""docs/model.md is the specification that "SPEC §N" means: every citation resolves there, and its config table
(and the README's) lists every HopeConfig field with the default the code has.

Pure text checks against the source tree: no model is built, the whole module runs in well under a second.
"""
from __future__ import annotations

import ast
import inspect
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hope import HopeConfig
from hope import configuration_hope

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "model.md"
README = ROOT / "README.md"
# Build outputs, environments and run directories are not part of the source tree.
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".benchmarks"}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".cfg", ".toml", ".ini", ".txt", ".yaml", ".yml"}


def _source_files(suffixes: set[str]) -> Iterator[Path]:
    """The repository's text files with these suffixes (plus Makefile and .ci/run), environments pruned unread."""
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(directory) / name
            if path.suffix in suffixes or name in ("Makefile", "run"):
                yield path


def _spec_text() -> str:
    if not SPEC.is_file():
        pytest.fail(f"{SPEC.relative_to(ROOT)} is missing: it is the specification that every 'SPEC §N' cites")
    return SPEC.read_text(encoding="utf-8")


def _sections(text: str) -> dict[str, str]:
    """Section number ("2", "2.10") -> its text (heading to the next heading of the same or a higher level)."""
    headings = list(re.finditer(r"^(#{2,3}) (\d+(?:\.\d+)?)\.? ", text, flags=re.M))
    sections = {}
    for i, match in enumerate(headings):
        level = len(match.group(1))
        end = next((h.start() for h in headings[i + 1:] if len(h.group(1)) <= level), len(text))
        sections[match.group(2)] = text[match.start():end]
    return sections


# "SPEC §2", "SPEC §1-§5", "SPEC §2/§3", "SPEC §3, §5 cache", "SPEC §2.4": every § number of the run.
CITATION = re.compile(r"SPEC('s)? (§\d+(?:\.\d+)?(?:(?:\s*[-/–]\s*|, | and )§\d+(?:\.\d+)?)*)")
# A named part: SPEC §2 v2 "Deep memory", SPEC §3 "Gradient".
NAMED = re.compile(r"SPEC §(\d+)(?:\.\d+)?(?: v2)?,? \"([^\"]+)\"")


def _citations() -> list[tuple[str, int, str, str]]:
    """(file, line, section number, the citation's text) for every SPEC § citation in the source tree."""
    found = []
    for path in _source_files({".py", ".md"}):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for match in CITATION.finditer(line):
                for section in re.findall(r"§(\d+(?:\.\d+)?)", match.group(2)):
                    found.append((str(path.relative_to(ROOT)), number, section, match.group(0)))
    return found


def test_every_spec_citation_names_a_section_of_docs_model_md():
    sections = _sections(_spec_text())
    for top in map(str, range(1, 8)):  # the numbering the code has cited since the first spec
        assert top in sections, f"docs/model.md has no section §{top} (headings must read '## {top}. ...')"
    citations = _citations()
    assert len(citations) > 50, f"only {len(citations)} SPEC citations found: is the scan looking at the tree?"
    dangling = [f"{file}:{line}: {text}" for file, line, section, text in citations if section not in sections]
    assert not dangling, "SPEC citations of sections that docs/model.md lacks:\n" + "\n".join(dangling)


def test_every_named_spec_citation_names_a_part_of_its_section():
    sections = _sections(_spec_text())
    missing = []
    for path in _source_files({".py", ".md"}):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for match in NAMED.finditer(line):
                section, name = match.groups()
                headings = re.findall(r"^#{2,3} .*$", sections.get(section, ""), flags=re.M)
                if not any(name.lower() in heading.lower() for heading in headings):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert not missing, "named SPEC citations that no heading of their docs/model.md section names:\n" + "\n".join(missing)


def test_nothing_cites_the_spec_outside_the_repository():
    # The strings are assembled so that this file does not match itself.
    forbidden = ["shared/" + "SPEC", "../" + "shared", "SPEC" + ".md"]
    hits = []
    for path in _source_files(TEXT_SUFFIXES):
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{number}: {bad}" for bad in forbidden if bad in line]
    assert not hits, "references to a spec outside the repository (cite docs/model.md instead):\n" + "\n".join(hits)


# ---------------------------------------------------------------------------------------------------------
# The config tables


def _config_fields() -> dict[str, object]:
    """The public HopeConfig fields, its __init__ parameters, with their signature defaults."""
    parameters = inspect.signature(HopeConfig.__init__).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _table_rows(text: str) -> list[tuple[list[str], list[str]]]:
    """(field names, cells) of every row of the markdown tables in text whose first cell names fields."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        if names and re.fullmatch(r"(`\w+`(,\s*)?)+", cells[0]):
            rows.append((names, cells))
    return rows


def _split_top_level(cell: str) -> list[str]:
    """Split on commas outside brackets: "1, [2, 3], None" -> ["1", "[2, 3]", "None"]."""
    parts, depth, current = [], 0, ""
    for char in cell:
        depth += char in "[({"
        depth -= char in "])}"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()]


_SENTINEL = object()


def _literal(cell: str) -> object:
    """The Python literal a default cell starts with (backticked or bare), or _SENTINEL for a rule in words."""
    backticked = re.match(r"`([^`]+)`", cell)
    candidate = backticked.group(1) if backticked else cell
    try:
        return ast.literal_eval(candidate)
    except (ValueError, SyntaxError):
        return _SENTINEL


def _defaults_match(documented: object, default: object) -> bool:
    normalise = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
    documented, default = normalise(documented), normalise(default)
    if isinstance(default, bool) or isinstance(documented, bool):
        return type(default) is type(documented) and documented == default
    if isinstance(default, float) or isinstance(documented, float):
        return isinstance(documented, (int, float)) and isinstance(default, (int, float)) and math.isclose(documented, default)
    return documented == default


def _cms_hidden_default(config: HopeConfig) -> bool:
    return config.cms_hidden_size == [64 * math.ceil(8 * config.hidden_size / 3 / 64)] * len(config.cms_chunk_sizes)


def _cms_eta_default(config: HopeConfig) -> bool:
    want = [1.0 / ((size or 1) * config.hidden_size) for size in config.cms_chunk_sizes]
    return all(math.isclose(a, b) for a, b in zip(config.cms_eta_max, want, strict=True))


# Defaults that are rules, not literals (the signature says None): the words the table must use, and the check
# that HopeConfig() resolves the rule that way.
DERIVED: dict[str, tuple[str, Callable[[HopeConfig], bool]]] = {
    "num_key_value_heads": (r"^`?num_heads`?$", lambda c: c.num_key_value_heads == c.num_heads),
    "memory_hidden": (r"^head dim d$", lambda c: c.memory_hidden == c.head_dim),
    "cms_hidden_size": (r"^8/3 hidden_size.*64", _cms_hidden_default),
    "cms_eta_max": (r"^1 / \(C_l · hidden_size\)$", _cms_eta_default),
}
# Fields with a fixed set of values: every value must appear in the field's row.
CHOICES = {
    "mixer": configuration_hope.MIXERS,
    "objective": configuration_hope.OBJECTIVES,
    "memory_target": configuration_hope.MEMORY_TARGETS,
    "memory_retention": configuration_hope.MEMORY_RETENTIONS,
    "memory_depth": configuration_hope.MEMORY_DEPTHS,
    "adaptive": configuration_hope.ADAPTIVE,
    "cms_variant": configuration_hope.CMS_VARIANTS,
    "cms_objective": configuration_hope.OBJECTIVES,
    "kernel_backend": configuration_hope.KERNEL_BACKENDS,
}


def _check_table(label: str, text: str) -> None:
    fields = _config_fields()
    config = HopeConfig()
    documented: dict[str, tuple[str, str]] = {}
    for names, cells in _table_rows(text):
        assert len(cells) >= 2, f"{label}: the row of {names} has no default column"
        values = _split_top_level(cells[1]) if len(names) > 1 else [cells[1]]
        assert len(values) == len(names), f"{label}: the row of {names} gives {len(values)} defaults: {cells[1]!r}"
        for name, value in zip(names, values):
            assert name not in documented, f"{label}: `{name}` is listed twice"
            documented[name] = (value, " | ".join(cells))
    unknown = sorted(set(documented) - set(fields))
    assert not unknown, f"{label} documents fields that HopeConfig does not have: {unknown}"
    missing = [name for name in fields if name not in documented]
    assert not missing, f"{label} lacks the HopeConfig fields {missing}"
    wrong = []
    for name, (value, row) in documented.items():
        literal = _literal(value)
        if name in DERIVED and literal is _SENTINEL:
            words, resolves = DERIVED[name]
            if not re.search(words, value):
                wrong.append(f"`{name}`: the default {value!r} does not read {words!r}")
            elif not resolves(config):
                wrong.append(f"`{name}`: HopeConfig() no longer resolves the documented rule {value!r}")
        elif literal is _SENTINEL:
            wrong.append(f"`{name}`: the default {value!r} is neither a literal nor a known rule")
        elif not _defaults_match(literal, fields[name]):
            wrong.append(f"`{name}`: documented default {literal!r}, HopeConfig has {fields[name]!r}")
        for choice in CHOICES.get(name, ()):
            shown = f'"{choice}"' if isinstance(choice, str) else str(choice)
            if shown not in row:
                wrong.append(f"`{name}`: the allowed value {shown} is not in its row")
    assert not wrong, f"{label}:\n" + "\n".join(wrong)


def test_spec_section_7_lists_every_config_field_with_its_default():
    section = _sections(_spec_text()).get("7")
    assert section is not None, "docs/model.md has no §7 (config fields)"
    _check_table("docs/model.md §7", section)


def test_readme_configuration_table_lists_every_config_field_with_its_default():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Configuration.*?(?=^## )", text, flags=re.M | re.S)
    assert match, "README.md has no '## Configuration' section"
    _check_table("README.md configuration table", match.group(0))


def test_the_table_checks_catch_a_wrong_default_and_a_missing_field():
    """The checker itself: a changed default and a dropped row must both fail."""
    section = _sections(_spec_text())["7"]
    with pytest.raises(AssertionError, match="chunk_size"):
        _check_table("edited", section.replace("| `chunk_size` | `64` |", "| `chunk_size` | `32` |"))
    with pytest.raises(AssertionError, match="conv_size"):
        _check_table("edited", "\n".join(line for line in section.splitlines() if "`conv_size`" not in line))
    with pytest.raises(AssertionError, match="cms_hidden_size"):
        _check_table("edited", section.replace("8/3 hidden_size, rounded up to 64", "4 hidden_size"))
