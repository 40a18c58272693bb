"""The layering rule, read from the source (ast), so that it stays true:

- stage scripts (one per pipeline step, run as `python X.py`) import library modules, never each other;
- library modules never import a stage script, and the imports between them form no cycle;
- no `_private` name is imported from another file of the project;
- no file over 600 lines (model.py 550) and no function over 60 lines (tests, benchmarks/ and Triton
  kernels excepted).

Function-level imports count like module-level ones: an import inside a function is still a dependency.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"train_tokenizer", "data_process", "dataset_sft", "pretrain", "fine_tuning", "eval", "quantize",
          "convert", "bench", "plot_figures"}


def project_modules() -> dict[str, str]:
    """module name -> path, for the flat top-level files and the benchmarks package (part of bench.py)."""
    mods = {f[:-3]: os.path.join(REPO, f) for f in os.listdir(REPO) if f.endswith(".py")}
    bench_dir = os.path.join(REPO, "benchmarks")
    for f in os.listdir(bench_dir):
        if f.endswith(".py"):
            mods["benchmarks." + f[:-3] if f != "__init__.py" else "benchmarks"] = os.path.join(bench_dir, f)
    return mods


def imports_of(path, mods) -> list[tuple[str, list[str]]]:
    """(project module, names imported from it) for every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [a.name for a in node.names]
            if node.module in mods:
                out.append((node.module, names))
            else:  # `from benchmarks import decode` imports the module benchmarks.decode
                out += [(f"{node.module}.{n}", []) for n in names if f"{node.module}.{n}" in mods]
    return out


def is_stage(mod: str) -> bool:
    return mod in STAGES or mod.startswith("benchmarks")


def graph():
    mods = project_modules()
    return mods, {m: imports_of(p, mods) for m, p in mods.items()}


def test_stage_scripts_exist():
    mods = project_modules()
    assert STAGES <= set(mods), sorted(STAGES - set(mods))


def test_library_never_imports_a_stage_script():
    mods, edges = graph()
    bad = [f"{m} -> {d}" for m, deps in edges.items() if not is_stage(m) for d, _ in deps if is_stage(d)]
    assert not bad, bad


def test_stage_scripts_never_import_each_other():
    mods, edges = graph()
    bad = [f"{m} -> {d}" for m, deps in edges.items() if is_stage(m) for d, _ in deps
           if is_stage(d) and not (m.startswith("benchmarks") and d.startswith("benchmarks"))
           and not (m == "bench" and d.startswith("benchmarks"))]
    assert not bad, bad


def test_no_import_cycles():
    mods, edges = graph()
    deps = {m: {d for d, _ in e if d != m} for m, e in edges.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(deps[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_private_name_crosses_files():
    mods, edges = graph()
    bad = [f"{m} imports {d}.{n}" for m, deps in edges.items() for d, names in deps for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def is_triton_kernel(fn) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


@pytest.mark.parametrize("limit_file,limit_model,limit_fn", [(600, 550, 60)])
def test_file_and_function_sizes(limit_file, limit_model, limit_fn):
    too_long = []
    for name, path in project_modules().items():
        if name.startswith("benchmarks"):
            continue
        lines = open(path).read().splitlines()
        limit = limit_model if name == "model" else limit_file
        if len(lines) > limit:
            too_long.append(f"{name}.py: {len(lines)} lines > {limit}")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > limit_fn:
                    too_long.append(f"{name}.py: {node.name}() {n} lines > {limit_fn}")
    assert not too_long, too_long
