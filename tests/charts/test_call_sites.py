"""Every chart a page draws goes through the one set of partials: axes with their labels, and a
value on hover (an SVG <title>) for what is plotted. A new chart drawn bare fails here."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted(
    path
    for path in ROOT.glob("**/templates/**/*.html")
    if ".venv" not in path.parts and "node_modules" not in path.parts
)
# A chart is an <svg> shown as an image (icons and legend swatches are aria-hidden).
SVG = re.compile(r'<svg\b[^>]*role="img".*?</svg>', re.DOTALL)
CHARTS = [
    pytest.param(svg, id=f"{path.relative_to(ROOT)}#{number}")
    for path in TEMPLATES
    for number, svg in enumerate(SVG.findall(path.read_text()), start=1)
]


def test_every_call_site_is_found():
    """The billing, ops, serving (two) and job pages draw charts."""
    assert len(CHARTS) >= 5


@pytest.mark.parametrize("svg", CHARTS)
def test_every_chart_draws_axes_and_hover_values(svg):
    assert '{% include "charts/axes.html" %}' in svg
    assert "<title>" in svg
