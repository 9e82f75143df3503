"""The package layout's rules (docs/design.md, "Map"): dependencies point one way, the host-side
engine and the planner hold no device code, nothing test-only ships, files stay readable."""

import subprocess
import sys

import pytest

from tests.support.import_graph import ROOT, import_graph, longest_chain, module_files

MAX_DEPTH = 8
MAX_LINES = 450
DEVICE_LIBS = ("jax", "jaxlib", "flax", "orbax")


def _all_imports(prefix: str) -> dict[str, set[str]]:
    """Every project module (and external top-level library) each module under `prefix` imports,
    eagerly or lazily, read from its source."""
    import ast

    out = {}
    for module, path in module_files().items():
        if module != prefix and not module.startswith(prefix + "."):
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module)
        out[module] = names
    return out


def _offenders(prefix: str, banned: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for module, names in _all_imports(prefix).items():
        hits = sorted(n for n in names if any(n == b or n.startswith(b + ".") for b in banned))
        if hits:
            bad[module] = hits
    return bad


def test_engine_is_host_side_only():
    """dsjax/engine: no jax/flax, no runtime (it drives a Runner through its interface), no planner."""
    assert _offenders("dsjax.engine", DEVICE_LIBS + ("dsjax.runtime", "dsjax.planner", "models", "pallas_kernels", "serving")) == {}


def test_planner_has_no_device_code():
    """dsjax/planner: plain Python + numpy; it imports the engine's policies, never the runtime."""
    assert _offenders("dsjax.planner", DEVICE_LIBS + ("dsjax.runtime", "dsjax.bench", "models", "serving")) == {}


def test_lower_layers_never_import_upper_ones():
    assert _offenders("models", ("dsjax", "serving")) == {}
    assert _offenders("pallas_kernels", ("dsjax", "models", "serving")) == {}
    assert _offenders("dsjax.runtime", ("dsjax.planner", "dsjax.bench", "serving")) == {}
    assert _offenders("serving", ("dsjax.bench", "dsjax.planner")) == {}


def test_nothing_installed_imports_tests():
    for prefix in ("dsjax", "models", "pallas_kernels", "serving"):
        assert _offenders(prefix, ("tests",)) == {}, prefix


def test_no_cycles_and_at_most_eight_floors():
    eager, _ = import_graph()
    chain = longest_chain(eager)  # raises on a cycle
    assert len(chain) <= MAX_DEPTH, " -> ".join(chain)


def test_longest_chain_finds_cycles():
    with pytest.raises(ValueError, match="a -> b -> a"):
        longest_chain({"a": {"b"}, "b": {"a"}})
    assert longest_chain({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == ["a", "b", "c"]


def test_hand_written_files_stay_readable():
    paths = [p for pkg in ("dsjax", "models", "pallas_kernels", "serving", "tests") for p in (ROOT / pkg).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in paths if "_pb2" not in p.name
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_engine_and_planner_import_without_jax():
    """At run time too (not only in the source): the schedulers, engines, simulator, load generator and
    the router with both its fronts load no jax."""
    code = ("import sys; import dsjax.engine.colocated, dsjax.engine.disaggregated, dsjax.engine.threaded, "
            "dsjax.planner.simulator, dsjax.planner.algorithms, dsjax.bench.loadgen, serving.router, serving.http_server, "
            "serving.validation; "
            "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
