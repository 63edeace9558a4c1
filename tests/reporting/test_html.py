"""The HTML report: rendered from a run recorded to disk by a JSONLSink and read back, self-contained, its tables
recomputed from the reports; partial and round-robin runs; and looked at in a real headless browser (Debian's
chromium: skipped where it is not installed, a failure in CI, whose .ci/run installs it)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from gradconflict import History
from gradconflict.fixtures.synthetic import make_problem
from gradconflict.records.sinks import JSONLSink
from gradconflict.reporting.html import render_html, write_html
from tests.runs import drawn_run, pair_values, planted_run

pytest.importorskip("matplotlib")
SECTIONS = [
    "The run", "Pairwise cosines over time", "Cancellation and update norm", "Task norms and alignment",
    "Conflict per layer over time", "Layer profile and branch point", "Affinity and task groups",
    "Advice and evidence",
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A two-task problem whose top block conflicts (its side path, by construction), trained 80 steps with every
    step streamed to disk: enough for the conflict's persistence to be decided."""
    path = tmp_path_factory.mktemp("run") / "run.jsonl"
    make_problem("top_conflict", seed=0).train(80, sinks=[JSONLSink(path)])
    return History.from_jsonl(path)


#: the layer the problem's conflict sits in: the side path of its top block (``synthetic``'s "upper-3")
TOP = "backbone.3.side"


class Page(HTMLParser):
    """Every tag, image source, link target and table row of a page; unbalanced tags are counted."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.open, self.sources, self.targets, self.rows, self.headings = [], [], [], [], []
        self.unbalanced = 0
        self._row, self._heading = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "img":
            self.sources.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.targets.append(attrs[key])
        if tag == "tr":
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._row.append("")
        if tag == "h2":
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.open or self.open.pop() != tag:
            self.unbalanced += 1
        if tag == "tr":
            self.rows.append(self._row)
            self._row = None
        if tag == "h2":
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        if self._row is not None and self._row:
            self._row[-1] += data
        if self._heading is not None:
            self._heading += data


def test_the_page_is_self_contained_and_tells_the_whole_story(recorded, tmp_path):
    path = write_html(recorded, tmp_path / "out" / "report.html", source="run.jsonl", png_dir=tmp_path / "png")
    page = Page(path.read_text(encoding="utf-8"))
    assert page.unbalanced == 0 and not page.open
    assert page.headings == SECTIONS
    assert page.targets == []  # no script, stylesheet or link to load
    assert len(page.sources) == 7 and all(s.startswith("data:image/png;base64,") for s in page.sources)
    from matplotlib import image

    for source in page.sources:
        pixels = image.imread(io.BytesIO(base64.b64decode(source.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 200 and pixels.std() > 0.01
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in page.sources}
    assert {p.read_bytes() for p in (tmp_path / "png").glob("*.png")} == embedded


def test_the_tables_hold_the_numbers_of_the_reports(recorded):
    page = Page(render_html(recorded))
    steps, values = pair_values(recorded, "a", "b")
    row = next(r for r in page.rows if r[0] == "a/b")
    assert row[1] == str(len(steps)) == "80"
    assert row[2] == f"{np.mean(values):+.3f}" and row[3] == f"{np.mean(np.array(values) < 0):.0%}"
    layer = next(r for r in page.rows if r[0] == TOP)  # the problem's conflicting top layer
    _, top = pair_values(recorded, "a", "b", layer=TOP)
    assert layer[4] == f"{np.mean(np.array(top) < 0):.2f}"
    assert any(r[-1] == "branch point" for r in page.rows)


def test_the_verdict_and_the_evidence_are_those_of_the_advice(recorded):
    from gradconflict.diagnosis import advise

    advice = advise(recorded)
    text = render_html(recorded, advice=advice)
    assert f'class="verdict {advice.verdict}"' in text
    for signal in advice.signals:
        assert signal.name in text
    assert "from gradconflict import advise, compare" in text  # the next step, as code


@pytest.mark.parametrize("kind", ["partial", "round_robin"])
def test_partial_and_round_robin_runs(kind):
    text = render_html(drawn_run(kind, steps=30))
    assert "tasks (measured steps carrying each)" in text and text.count("data:image/png;base64,") == 7
    if kind == "round_robin":
        assert "no measured step carried two tasks together" in text
        assert re.search(r"<td[^>]*>a/b</td><td[^>]*>0</td>", text)
    else:
        assert "pairs measured together: a/b 30, a/c 6, b/c 6 of 30" in text


def test_an_empty_run_is_a_clear_error():
    with pytest.raises(ValueError, match="no measured step"):
        render_html([])


@pytest.fixture(scope="module")
def attributed(tmp_path_factory):
    """A run measured with sample_ids whose planted 5% of the examples carry the conflict (``tests.runs``), saved
    by a JSONLSink: ``(history, saved file, planted ids)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("attributed") / "run.jsonl"
    try:
        monitor, planted, _ = planted_run(path)
    finally:
        torch.set_num_threads(threads)
    return monitor.history, path, planted


def test_the_examples_that_carry_the_conflict_are_shown_with_sample_ids(attributed, tmp_path):
    from gradconflict.apps.cli import main
    from gradconflict.diagnosis import advise
    from gradconflict.diagnosis.examples import conflicting_examples

    history, path, planted = attributed
    page = Page(render_html(history))
    assert page.headings == [*SECTIONS, "Examples that carry the conflict"]
    assert len(page.sources) == 8 and page.unbalanced == 0
    # The structured data that feeds the table: the rule's examples of the only pair, as the advice names them.
    found = conflicting_examples(history.samples, "a", "b")
    assert advise(history).examples == [found]
    assert len(set(found.ids) & planted) / len(found.ids) > 0.5
    rows = [r for r in page.rows if len(r) == 7 and r[0].isdigit()]
    assert [int(r[1]) for r in rows] == list(found.ids[:20])
    assert [r[6] for r in rows] == [f"{e.share:.1%}" for e in found.examples[:20]]
    stats = history.samples.pair("a", "b")  # each row's numbers, read from the tally itself
    assert all(int(r[2]) == stats[int(r[1])]["count"] and r[3] == f"{stats[int(r[1])]['agreement']:+.3f}"
               for r in rows)
    text = render_html(history)
    assert 'id="fig-examples"' in text and html.escape(found.sentence()) in text
    # A run without sample_ids has neither; the command line's report reads the tally back from the file.
    assert "Examples that carry the conflict" not in render_html(drawn_run("full", steps=20))
    out = tmp_path / "report.html"
    assert main(["report", str(path), "-o", str(out)]) == 0
    saved = out.read_text(encoding="utf-8")
    assert "<h2>Examples that carry the conflict</h2>" in saved and saved.count("data:image/png;base64,") == 8


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: In CI (``CI=true``, which .ci/run's environment sets) a missing browser fails the test: CI installs chromium.
BROWSER_REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Appended to a copy of the page (the report itself has no script): once every image has loaded or failed,
#: writes what the browser rendered into an element that ``--dump-dom`` prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  const verdict = document.querySelector(".verdict");
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images, verdict: verdict ? verdict.innerText : null,
                                      text: document.body.innerText});
  document.body.appendChild(probe);
});
</script>"""


def chromium(*args: str, profile) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if BROWSER_REQUIRED:
            pytest.fail("chromium is not installed, and CI must check the report in a browser: .ci/run installs it "
                        "with apt-get install chromium; see its output")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


def test_a_headless_browser_renders_the_page(browser, recorded, tmp_path):
    from gradconflict.diagnosis import advise

    advice = advise(recorded)
    assert advice.verdict == "physical_split"  # the problem's truth: its top layers conflict
    path = write_html(recorded, tmp_path / "report.html", advice=advice)
    # The screenshot: not blank, and the verdict box of a physical split (its red left border) near the top.
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,3000", path.as_uri(), profile=tmp_path / "profile-1")
    from matplotlib import image

    pixels = image.imread(shot)
    assert pixels.shape[:2] == (3000, 1400)
    ink = (pixels[..., :3] < 0.9).any(-1)  # anything darker than the page's near-white
    assert ink.mean() > 0.05
    red = (pixels[:400, :, 0] > 0.7) & (pixels[:400, :, 1] < 0.3) & (pixels[:400, :, 2] < 0.3)
    assert red.sum() > 500
    # The rendered DOM: every figure decoded, the verdict box and the task names in the text the browser shows.
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = chromium("--dump-dom", "--virtual-time-budget=10000", probed.as_uri(), profile=tmp_path / "profile-2")
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found is not None, done.stderr[-2000:]
    rendered = json.loads(html.unescape(found.group(1)))
    assert len(rendered["images"]) == 7
    for complete, width, height in rendered["images"]:
        assert complete and width > 200 and height > 50  # a PNG that failed to decode has naturalWidth 0
    assert rendered["verdict"].startswith("Split physically")
    assert f"Task groups: {' | '.join('[' + ', '.join(g) + ']' for g in advice.groups)}" in rendered["verdict"]
    assert advice.branch_point in rendered["verdict"]
    assert f"tasks {', '.join(recorded.tasks)};" in rendered["text"]  # the run's facts name the tasks
    assert re.search(r"a/b\s+80\s", rendered["text"])  # the pair's row: the two tasks measured together 80 times
