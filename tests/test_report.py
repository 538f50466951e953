"""`nudgeflow report` on a store the real flow filled, checked in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nudgeflow.charts import Series, bars, lines
from nudgeflow.report import SECTIONS
from tests.helpers import delete_keys

CONFIG = Path(__file__).parents[1] / "config"
FLOW_CONFIG = f"""
name: nudgeflow_report
source:
  kind: simulator
  simulator: {{users: 300, events: 4000, partitions: 2, seed: 11, bad_rate: 0.01}}
features: {{definitions: {CONFIG / "features.yaml"}}}
redis: {{url: "{{redis_url}}", key_prefix: {{prefix}}, ttl: 1h, embedded: true}}
clickhouse: {{chdb_path: ch}}
actions: {{kind: file, path: out/actions.jsonl}}
dlq: {{kind: file, path: out/dlq.jsonl}}
triggers: {CONFIG / "triggers.yaml"}
models: {CONFIG / "models.yaml"}
"""
ENV = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
#: appended to a copy of the report: the browser writes the rendered size of every chart mark into the DOM
MEASURE = """<script>
document.body.dataset.marks = JSON.stringify([...document.querySelectorAll('svg.chart')].map(svg => ({
  label: svg.getAttribute('aria-label'),
  svg: [svg.getBoundingClientRect().width, svg.getBoundingClientRect().height],
  marks: [...svg.querySelectorAll('rect.bar, path.line, path.error-bar, circle.point')].map(m => {
    const b = m.getBoundingClientRect(); return [m.getAttribute('class'), b.width, b.height]; }),
})));
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: `make tools` installs Debian's package (apt-get install chromium)"
    # a virtual time budget makes headless Chromium finish loading and painting before it captures,
    # however busy the machine is (without it a loaded machine can yield a blank screenshot)
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


def nudgeflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nudgeflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Path]:
    """A report of a run of the main flow: simulator → flow → chDB (its own folder, read in a subprocess).
    Its own key prefix: on a Redis kept from an earlier run, that run's idempotency keys made every action
    of this one a duplicate (the stream is the same), and the report had no latency to draw."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = tmp / "local.yaml"
    prefix = f"nfreport{uuid.uuid4().hex[:12]}"
    cfg.write_text(FLOW_CONFIG.replace("{redis_url}", redis_url).replace("{prefix}", prefix))
    try:
        run = nudgeflow("run", "--config", str(cfg), "--workers", "2", "--no-summary", cwd=tmp)
        assert run.returncode == 0, run.stderr[-3000:]
        made = nudgeflow("report", "--config", str(cfg), "--out", str(tmp / "report.html"), cwd=tmp)
        assert made.returncode == 0, made.stderr[-3000:]
        yield tmp / "report.html"
    finally:
        delete_keys(redis_url, prefix)


def test_report_is_self_contained_and_has_every_section(report: Path) -> None:
    html = report.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html) and "<script" not in html  # nothing to fetch
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="chart"') == len(SECTIONS)
    assert "no data in this period" not in html
    for s in SECTIONS:
        assert f"<h2>{s.title}</h2>" in html.replace("&gt;", ">")


def test_charts_are_drawn_in_chromium(report: Path) -> None:
    probe = report.with_name("measured.html")
    probe.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    proc = chromium("--dump-dom", probe.as_uri())
    m = re.search(r'data-marks="([^"]*)"', proc.stdout)
    assert m, proc.stderr[-2000:]
    charts = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert [c["label"] for c in charts] == [s.title for s in SECTIONS]
    for c in charts:
        assert c["svg"][0] > 300 and c["svg"][1] > 150, c["label"]
        drawn = [(kind, w, h) for kind, w, h in c["marks"] if w > 0 and h > 0]
        assert drawn, f"nothing drawn in {c['label']}"
    kinds = {kind for c in charts for kind, w, h in c["marks"] if w > 0 and h > 0}
    assert {"bar", "line", "error-bar", "point"} <= kinds


def test_screenshot_is_not_blank(report: Path) -> None:
    shot = report.with_name("report.png")
    proc = chromium(f"--screenshot={shot}", "--window-size=800,3000", report.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    png = shot.read_bytes()
    idat = b"".join(png[i + 8:i + 8 + int.from_bytes(png[i:i + 4], "big")]
                    for i in (m.start() - 4 for m in re.finditer(b"IDAT", png)))
    pixels = zlib.decompress(idat)
    # a blank page is one colour: its filtered rows are all zero bytes but each row's filter type
    assert len(set(pixels)) > 100 and len(pixels) - pixels.count(0) > 0.005 * len(pixels)


def test_charts_without_data_say_so_and_scale_errors_and_logs() -> None:
    assert "no data in this period" in bars("empty", [], [])
    assert "no data in this period" in lines("empty", [], [Series("s", [])])
    svg = bars("u", ["a", "b"], [Series("uplift", [5.0, -2.0], [(1.0, 9.0), (-8.0, 4.0)])])
    assert svg.count('class="error-bar"') == 2 and ">-10<" in svg  # the axis reaches below the lowest bound
    log = bars("l", ["a", "b"], [Series("p50", [80.0, 4e8])], log=True)
    assert ">10<" in log and ">1G<" in log
