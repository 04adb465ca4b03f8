"""The package's shape: one engine contract, a pure core that runs without torch, no import loops, and
one definition of the line format shared by the parser and the constrained decoder."""

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmtags.constrain.grammar import ATTR_MAX_CHARS, free_attr_ok
from llmtags.engines.adapter_set import AdapterEngine, AdapterSet
from llmtags.engines.base import Engine
from llmtags.engines.cache import CachedEngine, GenerationCache
from llmtags.engines.llamacpp import LlamaCppEngine
from llmtags.engines.transformers import TransformersEngine
from llmtags.parse import clean_tag

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmtags"
ENGINE_CLASSES = (TransformersEngine, LlamaCppEngine, AdapterEngine, CachedEngine)


@pytest.mark.parametrize("engine_class", ENGINE_CLASSES, ids=lambda c: c.__name__)
def test_every_engine_has_the_protocols_generate(engine_class):
    expected = inspect.signature(Engine.generate).parameters
    found = inspect.signature(engine_class.generate).parameters
    assert list(found) == list(expected)
    for name, parameter in expected.items():
        assert found[name].kind == parameter.kind, name
        assert found[name].default == parameter.default or name == "batch_size", name


def test_engine_instances_satisfy_the_protocol(tiny_engine, tiny_model_dir, tmp_path):
    adapter_set = AdapterSet(tiny_engine.model, tiny_engine.tokenizer)
    cached = CachedEngine(tiny_engine.tokenizer, lambda: tiny_engine, GenerationCache(tmp_path / "g.sqlite"), "tiny")
    for engine in (tiny_engine, adapter_set.engine(None), cached):
        assert isinstance(engine, Engine)
    assert not isinstance(object(), Engine)


def test_the_pure_core_runs_without_torch():
    """records, prompts, parse, vocab, candidates, spans, metrics, grounding, options and the run plan
    import and work in a process where torch (and what needs it) cannot be imported."""
    script = textwrap.dedent("""
        import sys

        class Blocker:
            BLOCKED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "llama_cpp")

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Blocker())
        from llmtags import candidates, grounding, metrics, options, parse, plan, prompts, records, spans, vocab

        record = records.Record("1", records.clean_text("<b>理肤泉</b> 特安舒缓霜 40ml"), tags=["品牌:理肤泉"])
        tags = parse.parse_tags("1. 品牌:理肤泉\\n2. 型号:40ml")
        assert tags == ["品牌:理肤泉", "型号:40ml"], tags
        assert metrics.score([record.tags], [tags]).micro.recall == 1.0
        built = plan.plan_run(options.Settings(template="tuned", max_new_tokens=32)).options
        assert built.max_new_tokens == 32 and built.template.name == "tuned"
        assert grounding.evidence_spans(record.text, tags, tags)[0] == (0, 3)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _project_imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Module-level imports between the project's modules, and project imports inside functions."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    inner: list[tuple[str, int, str]] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ImportFrom):
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1] if child.level else []
                    target = ".".join(base + ([child.module] if child.module else [])) if child.level else child.module
                    if target and target.split(".")[0] == "llmtags":
                        if in_function:
                            inner.append((name, child.lineno, target))
                        for alias in child.names:
                            full = f"{target}.{alias.name}"
                            graph[name].add(full if full in modules else target)
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(child, True)
                elif not (isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING"):
                    visit(child, in_function)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return graph, inner


def test_no_import_loop_and_no_project_imports_inside_functions():
    graph, inner = _project_imports()
    assert inner == [], "project modules imported inside functions (a loop hiding?)"
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import loop: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for target in graph.get(node, ()):
            walk(target, path + [node])
        done.add(node)

    for module in graph:
        walk(module, [])


def test_the_parser_and_the_constraints_share_the_attribute_limit():
    longest, too_long = "a" * ATTR_MAX_CHARS, "a" * (ATTR_MAX_CHARS + 1)
    assert clean_tag(f"{longest}: v") == f"{longest}:v"  # read as attribute:value
    assert clean_tag(f"{too_long}: v") == f"{too_long}: v"  # not split: the whole line is a value
    assert free_attr_ok(longest.encode()) and not free_attr_ok(too_long.encode())
