"""The code's structure: layers without cycles, a control API that never imports torch or Ray's
training libraries, and presets that ship inside the package."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "cluster", "jobs", "service")
HEAVY = ("torch", "deepspeed", "ray.train", "ray.tune", "ray.serve")


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, by every import statement at any depth."""
    mods = project_modules()
    graph = {}
    for m, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):
                    deps.add(t)
        graph[m] = deps
    return graph


def layer(m: str) -> int:
    """model and cluster 0; job configs 1; data and checkpoint 2; training 3; post-training,
    inference and reports 4; `python -m jobs.<stage>` entry modules 5; the service 6."""
    parts = m.split(".")
    if parts[0] in ("model", "cluster"):
        return 0
    if parts[0] == "service":
        return 6
    if m in ("jobs", "jobs.config") or parts[-1] == "config":
        return 1
    packages = {"data": 2, "checkpoint": 2, "train": 3, "posttrain": 4, "infer": 4, "report": 4}
    if parts[1] in packages:
        return packages[parts[1]]
    return 5


def test_no_import_cycles():
    graph = import_graph()
    seen, on_path, cycles = set(), [], []

    def visit(m):
        if m in on_path:
            cycles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        on_path.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# The service imports configs and the torch-free readers of what jobs write, nothing else of jobs/.
SERVICE_READERS = ("jobs.checkpoint.layout", "jobs.report")


def allowed(m: str, d: str) -> bool:
    if m.startswith("service"):
        return d.startswith("service") or layer(d) <= 1 or d.startswith(SERVICE_READERS)
    if d.startswith("service"):
        return False
    if layer(m) == 5:  # an entry module is wiring: it never imports another entry module
        return layer(d) < 5
    return layer(d) <= layer(m)


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} -> {d}" for m, deps in import_graph().items() for d in sorted(deps) if not allowed(m, d)]
    assert not bad, bad


def fresh_imports(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["service.main", "service.cli", "service.client", "jobs.data.config",
                                    "jobs.train.config", "jobs.posttrain.config", "jobs.infer.config",
                                    "jobs.checkpoint.config", "model.config"])
def test_the_api_and_the_configs_import_neither_torch_nor_ray_training(module):
    loaded = fresh_imports(f"import {module}")
    assert module in loaded
    heavy = [m for m in loaded if m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))]
    assert not heavy, f"{module} imports {heavy[:5]}"


def test_presets_ship_inside_the_package(tmp_path):
    """A wheel (not an editable install) carries the presets (and the GPU figures and the web console),
    and ModelConfig finds them there."""
    import shutil

    src = tmp_path / "src"  # setuptools writes build/ beside the sources: build a copy
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *PACKAGES):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("raylm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = (f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
            "import model.config as c\n"
            "assert c.__file__.startswith(sys.path[0]), c.__file__\n"
            "from importlib import resources\n"
            "g = resources.files('jobs.train').joinpath('gpus.yaml')  # the planner's GPU figures\n"
            "assert str(g).startswith(sys.path[0]) and g.is_file(), g\n"
            "ui = resources.files('service').joinpath('ui')  # the web console's pages and script\n"
            "assert all(ui.joinpath(f).is_file() for f in ('templates/job.html', 'static/console.js')), ui\n"
            "print(c.ModelConfig(preset='tiny').num_params(), c.preset_names())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    params, names = out.stdout.split(" ", 1)
    assert int(params) == 1311872 and "llama-70b" in names
