"""Writing the static site: data files loaded as scripts (a browser refuses fetch() of local
files from file://), pages rendered from templates with every value escaped, assets copied."""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from ..core.files import atomic_path

UNSAFE_IN_SCRIPT = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
"""Characters that could end a script element or a line of JavaScript: written as escapes,
so no corpus text can close the script it travels in."""


_AS_IS = frozenset({str, int, bool, type(None)})


def plain(value: Any) -> Any:
    """The value with numpy types as Python ones and non-finite floats as None (JSON null)."""
    kind = type(value)  # the common exact types first: a site holds millions of values
    if kind in _AS_IS:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is list:
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def js_literal(value: Any) -> str:
    """The value as a JavaScript literal (JSON) that is safe inside a script element."""
    text = json.dumps(plain(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in UNSAFE_IN_SCRIPT.items():
        text = text.replace(char, escape)
    return text


def data_path(key: str) -> str:
    """The site-relative path of a data file: key "f/gemma-3-270m.L12/3" -> data/f/....js."""
    return f"data/{key}.js"


def write_data(root: Path, key: str, value: Any) -> int:
    """Write one data file, which hands `value` to the page that loads it; returns its bytes."""
    text = f"samesheep.receive({json.dumps(key)},{js_literal(value)});\n"
    path = root / data_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def templates() -> Any:
    """The Jinja environment of the page templates, escaping every value it inserts."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("samesheep.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # js_literal escapes <, > and &, so its output is safe inside a script element as it is
    # (HTML-escaping it would hand the script "&#34;" instead of quotes).
    env.filters["js"] = lambda value: Markup(js_literal(value))
    env.filters["pct"] = percent
    env.filters["num"] = number
    return env


DASH = "\u2013"  # an en dash: a missing value


def percent(value: Any, digits: int = 1) -> str:
    """A share as a percentage ("12.3%"), or an en dash where it is missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return f"{100 * value:.{digits}f}%"


def number(value: Any, digits: int = 3) -> str:
    """A number for a table cell, thousands separated; an en dash where it is missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def write_page(root: Path, name: str, template: str, **context: Any) -> int:
    """Render one page template into root/name; returns its bytes."""
    html = templates().get_template(template).render(**context)
    data = html.encode("utf-8")
    with atomic_path(root / name) as tmp:
        tmp.write_bytes(data)
    return len(data)


def copy_assets(root: Path) -> None:
    """The style sheet and the script every page loads, beside the pages."""
    folder = root / "assets"
    folder.mkdir(parents=True, exist_ok=True)
    for item in resources.files("samesheep.report").joinpath("static").iterdir():
        if item.name.endswith((".css", ".js")):
            with atomic_path(folder / item.name) as tmp, resources.as_file(item) as src:
                shutil.copyfile(src, tmp)


def site_size(root: Path) -> tuple[int, int, int]:
    """(files, total bytes, bytes of the largest file) of the site."""
    sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes), max(sizes, default=0)
