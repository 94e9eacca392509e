"""Sphinx configuration of the skscoreflow documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx import addnodes

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package, when it is not installed

import skscoreflow  # noqa: E402

# -- project -------------------------------------------------------------------------------------
project = "skscoreflow"
author = "the skscoreflow developers"
copyright = "the skscoreflow developers"
version = release = skscoreflow.__version__

# -- general -------------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "**/.ipynb_checkpoints",
    # Markdown under benchmarks/ is built (see benchmarks.rst); anything else there is data.
]
root_doc = "index"
nitpicky = False
# Torch tensors default to float32 in examples; keep warnings from imports out of the build log.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# -- autodoc / autosummary / numpydoc ------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's public names are its __all__
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # types are in the numpydoc Parameters sections
autoclass_content = "class"

numpydoc_show_class_members = False  # the class template lists members with autodoc
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False
# Every documented object is validated; the build runs with -W, so a violation fails it.
numpydoc_validate = True
numpydoc_validation_checks = {
    "all",
    "ES01",  # extended summary: not required for short helpers
    "SA01",  # See Also: optional
    "EX01",  # Examples: required for every public name by tests/test_docs.py, not for methods
    "SS05",  # summaries may start with a formula (``sigma(t)``: ...) rather than a verb
    "PR08",  # descriptions may start with a code literal
    "PR09",
    "RT02",
    "RT04",
    "RT05",
}
def _public_constants() -> set[str]:
    """Full names of the module-level constants in the public ``__all__`` lists.

    They are documented by ``#:`` comments (checked, examples included, by tests/test_docs.py);
    numpydoc would validate the docstring of their *type* (``tuple``, ``dict``) instead.
    """
    import importlib
    import inspect
    import pkgutil

    names = set()
    for info in pkgutil.iter_modules(skscoreflow.__path__, "skscoreflow."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for mod_, public in ((mod, getattr(mod, "__all__", ())), (skscoreflow, skscoreflow.__all__)):
            for name in public:
                obj = getattr(mod_, name)
                if not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
                    names.add(f"{mod_.__name__}.{name}")
    return names


numpydoc_validation_exclude = {
    r"\.__init__$",
    r"\.__repr__$",
} | {"^" + name.replace(".", r"\.") + "$" for name in _public_constants()}

# -- MyST (the benchmark pages are Markdown written by benchmarks/*.py) --------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
suppress_warnings = [
    # GitHub-flavoured Markdown often jumps heading levels (# then ###); that is not an error.
    "myst.header",
]

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"skscoreflow {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Score-based diffusion density estimation with a scikit-learn interface",
    "fixed_sidebar": True,
}


# -- a directive listing every plot and CSV under docs/benchmarks/ --------------------------------
class BenchmarkFiles(Directive):
    """``.. benchmark-files::`` - every PNG (as a figure) and CSV (as a download) in benchmarks/.

    Globbing at build time keeps the page current when benchmark scripts add files.
    """

    has_content = False

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        root = DOCS / "benchmarks"
        out: list[nodes.Node] = []
        pngs = sorted(root.rglob("*.png"))
        csvs = sorted(root.rglob("*.csv"))
        for path in pngs + csvs:
            env.note_dependency(str(path))
        if pngs:
            section = nodes.rubric(text="Plots")
            out.append(section)
            for path in pngs:
                rel = path.relative_to(DOCS).as_posix()
                fig = nodes.figure()
                fig += nodes.image(uri="/" + rel, alt=rel)
                fig += nodes.caption(text=rel)
                out.append(fig)
        if csvs:
            out.append(nodes.rubric(text="Raw tables (CSV)"))
            items = nodes.bullet_list()
            for path in csvs:
                rel = path.relative_to(DOCS).as_posix()
                para = nodes.paragraph()
                ref = addnodes.download_reference(
                    "", "", reftarget="/" + rel, refdoc=env.docname, refexplicit=True
                )
                ref += nodes.literal(rel, rel)
                para += ref
                items += nodes.list_item("", para)
            out.append(items)
        return out


def _skip_undocumented_overrides(app, what, name, obj, skip, options):
    """Document an override only where it has its own docstring.

    ``VPSDE.std`` and friends implement methods documented once on the base class
    (:class:`skscoreflow.sde.SDE`); without their own docstring autodoc would repeat the base
    text on every subclass page.
    """
    if what != "class" or skip:
        return None
    func = getattr(obj, "fget", obj)  # properties
    if getattr(func, "__doc__", None) or not callable(func):
        return None
    return True


def setup(app):  # noqa: D103 - Sphinx hook
    app.add_directive("benchmark-files", BenchmarkFiles)
    app.connect("autodoc-skip-member", _skip_undocumented_overrides)
    return {"parallel_read_safe": True}
