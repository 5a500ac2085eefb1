"""The docs name what exists: every `module.function` (or `module.Class.method`, `Class.method`) written in backticks in
README.md or docs/*.md is found in the code, every file and tests/ path they mention is in the repository, every
relative link leads to a file, and every `--flag` written after `python SCRIPT.py` is one that script's parser knows.
Fast: the modules are imported, no model is loaded and no script runs.
"""
import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "safetensors", "png", "txt", "gguf", "gz"}  # `router.md` is a file


def backtick_spans(text: str) -> list[str]:
    """The inline code spans of a markdown text (fenced blocks are read by `commands`)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def dotted_references(span: str) -> list[str]:
    """`module.name[.name]` references in one code span; file names such as `router.md` are not references."""
    refs = []
    for m in re.finditer(r"(?<![\w./-])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)", span):
        first, rest = m.group(1), m.group(2)[1:].split(".")
        if rest[-1] in FILE_SUFFIXES:
            continue
        if first in MODULES or first[0].isupper():
            refs.append(".".join([first, *rest]))
    return refs


def classes_by_name() -> dict[str, list]:
    """Every class the project's modules define, by name (for `Class.method` references without the module)."""
    out = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == name:
                out.setdefault(attr, []).append(value)
    return out


def resolves(ref: str, classes: dict) -> bool:
    first, *rest = ref.split(".")
    if first in MODULES:
        targets = [importlib.import_module(first)]
    else:
        targets = classes.get(first, [])
    for obj in targets:
        for attr in rest:
            obj = getattr(obj, attr, None)
        if obj is not None:
            return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_references_exist(doc):
    classes = classes_by_name()
    text = doc.read_text()
    missing = sorted({ref for span in backtick_spans(text) for ref in dotted_references(span)
                      if (ref.split(".")[0] in MODULES or ref.split(".")[0] in classes) and not resolves(ref, classes)})
    unknown_classes = sorted({ref for span in backtick_spans(text) for ref in dotted_references(span)
                              if ref.split(".")[0] not in MODULES and ref.split(".")[0] not in classes
                              and re.fullmatch(r"[A-Z][a-z]\w*", ref.split(".")[0])
                              and not ref.split(".")[0].startswith(("Gemma", "Llama", "Qwen", "GPT", "Auto"))})
    assert not missing, f"{doc.name} names what the code does not have: {missing}"
    assert not unknown_classes, f"{doc.name} names classes no module defines: {unknown_classes}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_files_and_links_exist(doc):
    text = doc.read_text()
    scripts = {m for m in re.findall(r"(?<![\w/.-])(\w+\.py)\b", text)}
    test_paths = set(re.findall(r"\b(tests/[\w/]+\.py)", text))
    links = {m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m}
    missing = sorted(s for s in scripts if not (ROOT / s).exists() and not (ROOT / "tests" / s).exists())
    missing += sorted(p for p in test_paths if not (ROOT / p).exists())
    missing += sorted(link for link in links if not (doc.parent / link).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


class Parsed(Exception):
    """Raised instead of parsing, to hand back the parser a script builds."""

    def __init__(self, parser):
        self.parser = parser


def script_flags(script: str, monkeypatch) -> set[str]:
    """The option strings of a script's command line, read off its parser without running it."""
    def capture(parser, *args, **kwargs):
        raise Parsed(parser)
    module = importlib.import_module(script)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        m.setattr(sys, "argv", [f"{script}.py"])
        try:
            (module.parse_args if hasattr(module, "parse_args") else module.main)()
        except Parsed as p:
            return parser_flags(p.parser)
    raise AssertionError(f"{script}.py built no parser")


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands (course.py grade --part)."""
    flags = set()
    for action in parser._actions:
        flags |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
    return flags


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, flags) for every `python SCRIPT.py ...` command and every code span that starts `SCRIPT.py --...`,
    backslash-continued lines joined; a command ends at the end of its line, a `;`, `&`, `|` or a backtick."""
    text = text.replace("\\\n", " ")
    out = []
    for m in re.finditer(r"(?:python3? |`)(\w+)\.py([^\n;&|`]*)", text):
        out.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2))))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_command_flags_exist(doc, monkeypatch):
    found = {}
    unknown = []
    for script, flags in commands(doc.read_text()):
        if script not in MODULES or not flags:
            continue
        if script not in found:
            found[script] = script_flags(script, monkeypatch)
        unknown += [f"{script}.py {f}" for f in flags if f not in found[script]]
    assert not unknown, f"{doc.name} uses flags the scripts do not have: {sorted(set(unknown))}"


def test_the_checks_catch_a_stale_name():
    classes = classes_by_name()
    assert resolves("scoring.loglikelihoods", classes) and resolves("FreeMoE.gate_pattern", classes)
    assert not resolves("evaluate.loglikelihoods", classes) and not resolves("model.generate", classes)
    assert dotted_references("see `router.md` and `experts.export_hf`") == ["experts.export_hf"]
    assert commands("python train_router.py --experts e \\\n    --l2-seq-len 128 && ls --all") == [
        ("train_router", ["--experts", "--l2-seq-len"])]
