"""The package as a user gets it: no import cycle between its modules, and a wheel that holds
every subpackage and data file and runs from outside the checkout."""

import ast
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

PACKAGE = pathlib.Path(REPO) / 'crossformer_jax'


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def package_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in PACKAGE.rglob('*.py')}


def imported_modules(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules that `path` imports anywhere (top level or inside functions): a name
    imported from a package counts as its submodule when there is one, else as the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f'{node.module}.{alias.name}'
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None."""
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle_between_modules():
    modules = package_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules (to register them) is not a cycle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + '.')}
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('crossformer_'):
                offenders += [
                    f'{path.relative_to(REPO)}: {node.module}.{alias.name}'
                    for alias in node.names
                    if alias.name.startswith('_')
                ]
    assert not offenders


def test_the_model_path_does_not_import_torch_or_the_cpu_plug_in():
    """The runtime package imports PyTorch only for conversion checks and export, and the models
    never reach for the CPU plug-in."""
    modules = package_modules()
    for name, path in modules.items():
        if name.startswith('crossformer_jax.models'):
            assert not any(
                m.startswith('crossformer_jax.cpu') for m in imported_modules(path, modules)
            ), name
    code = (
        'import sys, crossformer_jax, crossformer_jax.models, crossformer_jax.tasks\n'
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'False'


def test_importing_the_library_and_configs_starts_no_backend():
    """Importing every module of the package and the configs creates no array: a multi-process
    run loads its config before jax.distributed.initialize, which must come before any backend
    starts."""
    names = sorted(n for n in package_modules() if not n.startswith('crossformer_jax.reference'))
    configs = sorted(
        os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        for path in glob.glob(os.path.join(REPO, 'configs', '**', '*.py'), recursive=True)
    )
    code = (
        'import importlib, sys\n'
        f'for name in {names + configs!r}:\n'
        '    importlib.import_module(name)\n'
        'from jax._src import xla_bridge\n'
        'print(sorted(xla_bridge._backends))'
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == '[]'


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """The wheel built from a copy of the checkout (setuptools builds in the source tree)."""
    source = tmp_path_factory.mktemp('source') / 'crossformer_jax'
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            '.git', '.venv', 'workdirs', 'build', '*.egg-info', '.*cache'
        ),
    )
    out = tmp_path_factory.mktemp('wheel')
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '--no-deps',
            '--no-build-isolation',
            '-q',
            '-w',
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = out.glob('crossformer_jax-*.whl')
    return path


def test_wheel_holds_every_subpackage_and_the_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {
        f'{module_name(p).replace(".", "/")}/__init__.py' for p in PACKAGE.rglob('__init__.py')
    }
    assert packages <= names, sorted(packages - names)
    modules = {str(p.relative_to(REPO)) for p in PACKAGE.rglob('*.py')}
    assert modules <= names, sorted(modules - names)
    assert 'crossformer_jax/cpu/kernels.cc' in names


def test_wheel_runs_a_forward_pass_and_train_help_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / 'site'
    install = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS='cpu')
    forward = (
        'import jax, jax.numpy as jnp, crossformer_jax\n'
        f'assert crossformer_jax.__file__.startswith({str(site)!r}), crossformer_jax.__file__\n'
        "m = crossformer_jax.create_model('crossformer_tiny', num_classes=4, embed_dim=32,"
        ' depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))\n'
        'x = jnp.ones((2, 64, 64, 3))\n'
        'print(m.apply(m.init(jax.random.key(0), x), x).shape)\n'
    )
    result = subprocess.run(
        [sys.executable, '-c', forward],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '(2, 4)'
    help_run = subprocess.run(
        [sys.executable, '-m', 'crossformer_jax.cli.train', '--helpfull'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # absl ends a help request with exit status 1.
    assert help_run.returncode == 1, help_run.stderr
    assert '--workdir' in help_run.stdout and '--mode' in help_run.stdout
