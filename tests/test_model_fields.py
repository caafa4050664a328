"""Every field of `TransformerConfig` is learned by the modules that must know the model,
or is exempted here with its reason.

A new field changes the model; three modules model it apart from the network itself:
model/flops.py (FLOPs, so MFU on every log line and the planner's times),
planning/memory.py (the planner's memory) and interop/hf.py (Hugging Face import and
export). A field that none of them reads fails `test_every_field_is_read_or_exempt`
until one of them reads it or EXEMPT names it with a reason (docs/ARCHITECTURE.md,
"Changing the model"). A reason that starts with "GAP:" marks a field that changes
FLOPs or memory although flops.py and memory.py do not read it yet: a known fault of
the estimates, listed so that it stays visible.

Read from the source with `ast` (nothing is imported). "Read" is deliberately loose: an
attribute access `<anything>.<field>` or the field's name as a string constant (a
mapping table) anywhere in the module.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Mapping

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "t5x_like"
CONFIG = ("model/layers.py", "TransformerConfig")
READERS = ("model/flops.py", "planning/memory.py", "interop/hf.py")

# field -> why flops.py, memory.py and hf.py need not read it (one line each).
EXEMPT = {
    "dropout_rate": "elementwise only (no model FLOPs), no weight; its masks when > 0 are "
                    "left out of memory's estimate (every preset trains with 0)",
    "z_loss": "a loss coefficient: log Z is computed either way; no FLOPs, memory or weight",
    "fused_loss": "memory.py reads it through families.fuses_loss (None: the platform's "
                  "default); the same FLOPs and weights either way",
}


def config_fields(source: str, class_name: str) -> list[str]:
    """The dataclass fields of `class_name` in `source`: its annotated class-level names,
    in order (ClassVar annotations are not fields)."""
    tree = ast.parse(source)
    cls = next(node for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name == class_name)
    return [stmt.target.id for stmt in cls.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            and "ClassVar" not in ast.unparse(stmt.annotation)]


def names_read(source: str) -> set[str]:
    """Every attribute name accessed (`x.name`) and every string constant in `source`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


def readers_of(fields: list[str], module_sources: Mapping[str, str]) -> dict[str, list[str]]:
    """field -> the modules (keys of `module_sources`) that read it."""
    read = {module: names_read(source) for module, source in module_sources.items()}
    return {field: [m for m in module_sources if field in read[m]] for field in fields}


def unread_fields(config_source: str, class_name: str,
                  module_sources: Mapping[str, str]) -> list[str]:
    """The fields of `class_name` that none of `module_sources` reads, in field order."""
    fields = config_fields(config_source, class_name)
    return [f for f, modules in readers_of(fields, module_sources).items() if not modules]


def _source(relative: str) -> str:
    return (PACKAGE / relative).read_text(encoding="utf-8")


def _readers() -> dict[str, str]:
    return {relative: _source(relative) for relative in READERS}


def test_every_field_is_read_or_exempt():
    unread = unread_fields(_source(CONFIG[0]), CONFIG[1], _readers())
    missing = [f for f in unread if f not in EXEMPT]
    assert missing == [], (
        f"TransformerConfig fields {missing} are read by none of {', '.join(READERS)}. A "
        "new field must teach FLOPs (model/flops.py), the planner's memory "
        "(planning/memory.py) and the Hugging Face mapping (interop/hf.py: map it, or "
        "refuse it with a clear message), or be added to EXEMPT in "
        "tests/test_model_fields.py with a one-line reason (docs/ARCHITECTURE.md, "
        "'Changing the model').")


def test_exemptions_are_real_fields_that_nothing_reads():
    """A stale exemption fails: the field was removed or renamed, or one of the modules
    reads it now (then the exemption and its reason, a GAP's above all, must go)."""
    fields = config_fields(_source(CONFIG[0]), CONFIG[1])
    assert sorted(set(EXEMPT) - set(fields)) == []
    readers = readers_of(list(EXEMPT), _readers())
    assert {f: modules for f, modules in readers.items() if modules} == {}
    assert all(reason.strip() and "\n" not in reason for reason in EXEMPT.values())


def test_a_field_that_nothing_reads_is_reported():
    """The check can fail: the real config with one more field (Mixture-of-Experts'
    `num_experts`, in memory only) is reported, and reading it in any one module, as an
    attribute or as a mapping key, clears it."""
    tree = ast.parse(_source(CONFIG[0]))
    cls = next(node for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name == CONFIG[1])
    last = max(i for i, stmt in enumerate(cls.body) if isinstance(stmt, ast.AnnAssign))
    cls.body.insert(last + 1, ast.parse("num_experts: int = 1").body[0])
    grown = ast.unparse(ast.fix_missing_locations(tree))
    readers = _readers()

    unread = unread_fields(grown, CONFIG[1], readers)
    assert "num_experts" in unread
    assert [f for f in unread if f not in EXEMPT] == ["num_experts"]

    as_attribute = dict(readers, **{"model/flops.py": readers["model/flops.py"]
                                    + "\n\ndef _experts(cfg):\n    return cfg.num_experts\n"})
    as_key = dict(readers, **{"interop/hf.py": readers["interop/hf.py"]
                              + '\n\n_MOE = {"num_local_experts": "num_experts"}\n'})
    for sources in (as_attribute, as_key):
        assert "num_experts" not in unread_fields(grown, CONFIG[1], sources)


def test_the_analysis_on_a_synthetic_dataclass():
    config = (
        "import dataclasses\nfrom typing import ClassVar\n\n"
        "@dataclasses.dataclass(frozen=True)\nclass Cfg:\n"
        "    KINDS: ClassVar[tuple] = ('a',)\n"
        "    emb_dim: int\n    num_experts: int = 1\n    rope_theta: float = 1e4\n"
        "    @property\n    def wide(self):\n        return self.emb_dim > 4\n")
    modules = {"flops.py": "def f(cfg):\n    return 6 * cfg.emb_dim\n",
               "hf.py": "_GLOBAL = {'rope_theta': 'rope_theta'}\n",
               "memory.py": "num_experts = 3  # a name, not a read\n"}
    assert config_fields(config, "Cfg") == ["emb_dim", "num_experts", "rope_theta"]
    assert unread_fields(config, "Cfg", modules) == ["num_experts"]
    assert readers_of(["emb_dim", "rope_theta"], modules) == {
        "emb_dim": ["flops.py"], "rope_theta": ["hf.py"]}
