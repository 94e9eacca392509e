"""Documentation checks.

* Every public name (each module's ``__all__`` and the package's) has a numpydoc docstring
  with an *Examples* section; module constants have a ``#:`` comment doc (what Sphinx shows)
  with an *Examples* section, and those examples run here (``--doctest-modules`` only sees
  docstrings).
* The quickstart (``docs/quickstart.rst``) runs: its Python blocks in order, in a temporary
  directory, and its ``$ skscoreflow ...`` command lines as subprocesses.
* The worked numbers of the user guide (``>>>`` blocks in ``docs/user_guide/*.rst``) are
  doctests.
* The defaults quoted in the hyperparameter table are the estimator's actual defaults.

The docs build itself (``python -m sphinx -W --keep-going -b html docs docs/_build/html``) runs
in ``.ci/run``.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

import skscoreflow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = re.compile(r"^[ \t]*Examples[ \t]*\n[ \t]*-{8,}[ \t]*$", re.MULTILINE)


def _modules() -> list[ModuleType]:
    mods = [skscoreflow]
    for info in pkgutil.iter_modules(skscoreflow.__path__, "skscoreflow."):
        if info.name.endswith("__main__"):  # importing it runs the command line
            continue
        mods.append(importlib.import_module(info.name))
    return mods


def _public_names() -> list[tuple[ModuleType, str]]:
    return [(mod, name) for mod in _modules() for name in getattr(mod, "__all__", ())]


def _is_data(obj: object) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj))


def _comment_doc(module: ModuleType, name: str) -> tuple[str | None, int]:
    """The ``#:`` comment block right above the module-level assignment of ``name``."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    for node in ast.parse(source).body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if name not in targets:
            continue
        i = node.lineno - 2  # line above the assignment (0-based)
        block: list[str] = []
        while i >= 0 and lines[i].lstrip().startswith("#:"):
            block.insert(0, re.sub(r"^\s*#: ?", "", lines[i]))
            i -= 1
        return ("\n".join(block) if block else None), i + 2
    return None, 0


PUBLIC = _public_names()


@pytest.mark.parametrize(
    ("module", "name"), PUBLIC, ids=[f"{m.__name__}.{n}" for m, n in PUBLIC]
)
def test_public_name_has_examples(module: ModuleType, name: str) -> None:
    obj = getattr(module, name)
    if not _is_data(obj):
        doc = obj.__doc__  # its own docstring, not one inherited from a base class
        assert doc, f"{module.__name__}.{name} has no docstring"
        assert EXAMPLES.search(inspect.cleandoc(doc)), (
            f"{module.__name__}.{name}: the docstring has no numpydoc 'Examples' section"
        )
        return
    doc, lineno = _comment_doc(module, name)
    assert doc, (
        f"{module.__name__}.{name} is a public constant without a '#:' comment doc above its "
        "assignment"
    )
    assert EXAMPLES.search(doc), f"{module.__name__}.{name}: the '#:' doc has no Examples section"
    test = doctest.DocTestParser().get_doctest(
        doc, dict(vars(module)), f"{module.__name__}.{name}", inspect.getsourcefile(module), lineno
    )
    assert test.examples, f"{module.__name__}.{name}: the Examples section has no >>> example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{module.__name__}.{name}: its '#:' example fails (see above)"


def test_every_public_module_is_documented() -> None:
    api = (DOCS / "api.rst").read_text()
    for mod in _modules():
        assert mod.__doc__, f"{mod.__name__} has no module docstring"
        short = mod.__name__.rpartition(".")[2]
        if mod is skscoreflow or short.startswith("_"):
            continue
        assert re.search(rf"^\s+{short}\s*$", api, re.MULTILINE), (
            f"{mod.__name__} is missing from the module list in docs/api.rst"
        )


# --------------------------------------------------------------------------------------------
# quickstart
# --------------------------------------------------------------------------------------------
def _code_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of every ``.. code-block::`` directive, in document order."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. code-block:: *(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2)
        i += 1
        while i < len(lines) and lines[i].strip().startswith(":"):  # directive options
            i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        blocks.append((lang, inspect.cleandoc("\n".join(body))))
    return blocks


def test_quickstart_blocks_are_found() -> None:
    blocks = _code_blocks(DOCS / "quickstart.rst")
    langs = [lang for lang, _ in blocks]
    assert langs.count("python") >= 5 and "console" in langs
    commands = [c for lang, code in blocks if lang == "console" for c in code.splitlines()]
    assert any(c.startswith("$ skscoreflow fit ") for c in commands)


@pytest.mark.slow
def test_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = os.environ.get("SKSCOREFLOW_TEST_THREADS", "2")
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, MPLBACKEND="Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "quickstart"}
    start = time.perf_counter()
    for lang, code in _code_blocks(DOCS / "quickstart.rst"):
        if lang == "python":
            exec(compile(code, "quickstart.rst", "exec"), namespace)
        elif lang == "console":
            for line in code.splitlines():
                if not line.startswith("$ skscoreflow "):
                    continue  # installation lines
                args = shlex.split(line[len("$ skscoreflow ") :])
                proc = subprocess.run(
                    [sys.executable, "-m", "skscoreflow", *args],
                    cwd=tmp_path,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert proc.returncode == 0, f"{line!r} failed:\n{proc.stderr}"
    elapsed = time.perf_counter() - start
    # What the page claims.
    assert namespace["est"].n_iter_ == 300
    assert namespace["logp"].shape == (500,)
    assert namespace["S"].shape == (1000, 2)
    assert namespace["deq"].sample(3, random_state=0).dtype.kind == "i"
    assert namespace["search"].best_params_["weighting"] in (
        "score_matching", "likelihood", "likelihood_is"
    )
    assert (tmp_path / "model.pt").exists() and len(namespace["logp_cli"]) == 200
    print(f"quickstart ran in {elapsed:.1f} s")


# --------------------------------------------------------------------------------------------
# user guide
# --------------------------------------------------------------------------------------------
GUIDE_DOCTESTS = sorted(p for p in (DOCS / "user_guide").glob("*.rst") if ">>>" in p.read_text())


@pytest.mark.parametrize("path", GUIDE_DOCTESTS, ids=[p.name for p in GUIDE_DOCTESTS])
def test_user_guide_doctests(path: Path) -> None:
    result = doctest.testfile(
        str(path),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{path.name}: {result.failed} example(s) failed (see above)"


def test_hyperparameter_table_matches_defaults() -> None:
    """The table in hyperparameters.rst lists every parameter with its actual default."""
    text = (DOCS / "user_guide" / "hyperparameters.rst").read_text()
    rows = dict(re.findall(r"^\s*\* - ``(\w+)``\s*\n\s+- ``([^`]*)``", text, re.MULTILINE))
    params = inspect.signature(skscoreflow.ScoreFlowDensity).parameters
    missing = sorted(set(params) - set(rows))
    assert not missing, (
        f"docs/user_guide/hyperparameters.rst: add a row for {missing} to the defaults table"
    )
    for name, quoted in rows.items():
        assert name in params, f"hyperparameters.rst documents an unknown parameter {name!r}"
        assert ast.literal_eval(quoted) == params[name].default, (
            f"hyperparameters.rst quotes {name}={quoted}, the default is "
            f"{params[name].default!r}"
        )
