"""The unified view's web page in a real headless browser (Debian's chromium driven by Playwright),
against a real sidecar fed through real sockets.

Screenshots are written to tests/artifacts/ (test output) and the job view also to
docs/screenshots/job-view.png (the README's picture).
"""

import re
import os
import shutil
from pathlib import Path

import pytest

from tests.harness import FILES_CONFIG, REPO, SidecarProcess
from tests.test_view import seed_job, timeline_message

playwright_sync = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
expect = playwright_sync.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "tests" / "artifacts"
README_SCREENSHOT = REPO / "docs" / "screenshots" / "job-view.png"
WAIT_MS = 15_000  # two shared cores: generous, but every wait ends as soon as its condition holds

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (Debian package `chromium`)")


def message(job, trace, source, seconds, kind, data, span=None, parent=None, day="2025-10-21T09"):
    return timeline_message(job, trace, source, seconds, kind, data, span, parent, hour=day)


def failed_job():
    """An import that fails in its second service: an error event and a failed span."""
    job, trace = "job-import-7781", "7" * 32
    return [
        message(job, trace, "api-gateway", 0.0, "event", {"level": "info", "message": "Upload accepted"}),
        message(job, trace, "api-gateway", 0.4, "span", {"name": "parse_upload", "phase": "start"}, span="c" * 16),
        message(job, trace, "api-gateway", 1.2, "span", {"name": "parse_upload", "phase": "end", "status": "success", "duration_ms": 800.0}, span="c" * 16),
        message(job, trace, "csv-validator", 1.3, "span", {"name": "validate_rows", "phase": "start"}, span="d" * 16, parent="c" * 16),
        message(job, trace, "csv-validator", 3.9, "event", {"level": "warning", "message": "42 rows with an empty email"}),
        message(job, trace, "csv-validator", 6.5, "event", {"level": "error", "message": "Row 1017: <b>unterminated quote</b>"}),
        message(job, trace, "csv-validator", 6.6, "span", {"name": "validate_rows", "phase": "end", "status": "error", "duration_ms": 5300.0}, span="d" * 16, parent="c" * 16),
    ]


def running_job():
    """Still in progress: an open span and 40 % progress."""
    job, trace = "job-report-31", "3" * 32
    return [
        message(job, trace, "scheduler", 0.0, "event", {"level": "info", "message": "Nightly report triggered"}, day="2025-10-21T10"),
        message(job, trace, "report-builder", 0.5, "span", {"name": "build_report", "phase": "start"}, span="e" * 16, day="2025-10-21T10"),
        message(job, trace, "report-builder", 12.0, "progress", {"job_id": job, "percent": 40, "status": "rendering"}, span="e" * 16, day="2025-10-21T10"),
    ]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("web")
    process = SidecarProcess(workdir, FILES_CONFIG.format(base=workdir / "out")).start()
    try:
        sent = seed_job() + failed_job() + running_job()
        process.send(sent)
        process.wait_for(lambda s: s["received"] == len(sent), what="the jobs received")
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    with playwright_sync.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1366, "height": 768},
            color_scheme="light",
        )
        context.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context, sidecar):
    """A fresh tab on the page; fails the test on any console error or uncaught exception."""
    page = browser_context.new_page()
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(f"http://127.0.0.1:{sidecar.http_port}/")
    page.evaluate("localStorage.clear()")
    yield page
    page.close()
    assert problems == []


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=False)
    return path


# Contrast of the text of each element matched, against the first opaque background behind it (WCAG).
CONTRASTS = """selectors => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor); if (c.length === 3 || c[3] > 0.5) return c; }
    return [255, 255, 255];
  };
  const out = [];
  for (const sel of selectors) for (const el of document.querySelectorAll(sel)) {
    const a = lum(rgb(getComputedStyle(el).color)), b = lum(background(el));
    out.push([sel, el.textContent.trim().slice(0, 30), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)]);
  }
  return out;
}"""
CHECKED = ["body", "h1", "nav a", ".badge", ".row-sub", ".muted", "thead th", "td.dur", ".err-count", "#timeline a", "button", ".axis span"]


def assert_readable(page):
    low = [(sel, text, round(ratio, 2)) for sel, text, ratio in page.evaluate(CONTRASTS, CHECKED) if text and ratio < 4.5]
    assert low == [], f"text below WCAG AA contrast 4.5:1: {low}"


def waterfall_rows(page):
    return page.locator("#waterfall-sources tr.row-source")


def test_the_job_list_and_the_seeded_jobs_waterfall(page, sidecar):
    rows = page.locator("#jobs-body tr")
    expect(rows.filter(has_text="job-12345")).to_have_count(1)
    expect(rows.filter(has_text="job-12345").locator(".badge")).to_have_text("completed")
    expect(rows.filter(has_text="job-import-7781").locator(".badge")).to_have_text("failed")
    expect(rows.filter(has_text="job-report-31").locator(".badge")).to_have_text("running")
    expect(rows.filter(has_text="job-12345")).to_contain_text("file-receiver, queue-service, db-loader")

    # Selecting from the list puts the job in the URL and draws its waterfall.
    page.get_by_role("link", name="job-12345", exact=True).click()
    expect(page).to_have_url(re.compile(r"#job=job-12345$"))
    expect(page.locator("#timeline h2")).to_have_text("Job job-12345")
    expect(waterfall_rows(page).locator(".label")).to_have_text(["file-receiver", "queue-service", "db-loader"])
    expect(waterfall_rows(page).locator("td.dur")).to_contain_text(["2.3s", "45.2s", "45.2s"])
    expect(page.locator("#timeline-total")).to_have_text("47.7s")
    expect(page.locator("#jobs-body tr.selected")).to_contain_text("job-12345")

    # Bars to scale on one axis: 0 .. 47.7 s across the track.
    track = waterfall_rows(page).first.locator(".track").bounding_box()
    scale = track["width"] / 47.7
    boxes = [row.locator(".bar").bounding_box() for row in waterfall_rows(page).all()]
    for box, (start, end) in zip(boxes, [(0.0, 2.3), (2.4, 47.6), (2.5, 47.7)]):
        assert abs(box["x"] - (track["x"] + start * scale)) < 3, (box, start)
        assert abs(box["width"] - (end - start) * scale) < 3, (box, start, end)

    # The span tree: process_job with load_data nested (indented) under it.
    spans = page.locator("#waterfall-spans tr.row-span")
    expect(spans.locator(".label")).to_have_text(["process_job", "load_data"])
    assert [row.get_attribute("data-depth") for row in spans.all()] == ["0", "1"]
    parent_label, child_label = (row.locator(".label").bounding_box() for row in spans.all())
    assert child_label["x"] > parent_label["x"] + 10
    for row in spans.all():
        assert row.locator(".bar").bounding_box()["width"] > 0.9 * 45.2 * scale
    expect(spans.locator("td.dur")).to_have_text(["45.2s", "45.2s"])
    assert_readable(page)
    shot = screenshot(page, "job-view.png")
    # The README's picture is refreshed on request only, so a test run leaves the tree clean.
    if os.environ.get("UPDATE_SCREENSHOTS") or not README_SCREENSHOT.exists():
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)

    # The list refreshes by itself: a job sent now appears without a reload.
    sidecar.send(seed_job("job-late-1", "9" * 32)[:4])
    expect(rows.filter(has_text="job-late-1")).to_have_count(1)


def test_a_failed_job_opened_by_its_url_marks_its_errors(page, sidecar):
    page.goto(f"http://127.0.0.1:{sidecar.http_port}/#job=job-import-7781")
    expect(page.locator("#timeline h2")).to_have_text("Job job-import-7781")
    expect(page.locator("#timeline .badge").first).to_have_text("failed")
    expect(waterfall_rows(page).locator(".label")).to_have_text(["api-gateway", "csv-validator"])
    failing = waterfall_rows(page).nth(1)
    expect(failing.locator(".err-count")).to_have_text("✕ 1 error")
    expect(failing.locator(".marker:not(.warning)")).to_have_count(1)
    expect(failing.locator(".marker.warning")).to_have_count(1)
    expect(failing.locator(".track")).to_have_attribute("aria-label", re.compile(re.escape("error at +6.5s: Row 1017: <b>unterminated quote</b>")))
    span = page.locator("#waterfall-spans tr.row-span[data-status=error]")
    expect(span.locator(".bar.failed")).to_have_count(1)
    expect(span.locator("td.dur")).to_contain_text("✕ error")
    # API text is shown as text, never parsed as markup.
    events = page.locator("details.events")
    expect(events).to_have_attribute("open", "")
    expect(events).to_contain_text("Row 1017: <b>unterminated quote</b>")
    assert page.locator("details.events b").count() == 0
    screenshot(page, "job-failed.png")

    # A running job: the open span runs to the end of the axis.
    page.get_by_role("link", name="job-report-31", exact=True).click()
    expect(page.locator("#timeline h2")).to_have_text("Job job-report-31")
    expect(page.locator("#waterfall-spans .bar.open")).to_have_count(1)
    expect(page.locator("#waterfall-spans td.dur")).to_have_text("running")

    # By keyboard: Enter on a job in the list opens it and moves the focus to its timeline.
    page.get_by_role("link", name="job-12345", exact=True).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#timeline h2")).to_have_text("Job job-12345")
    expect(page.locator("#timeline h2")).to_be_focused()


def test_the_live_tail_shows_messages_sent_after_it_started(page, sidecar):
    page.get_by_role("link", name="Live tail").click()
    page.get_by_label("Source").fill("tail-probe")
    page.get_by_label("Type").select_option("event")
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#tail-state")).to_have_attribute("data-state", "open")
    sidecar.send([
        {"source": "noise", "type": "event", "data": {"level": "info", "message": "not for this tail"}},
        {"source": "tail-probe", "type": "metric", "data": {"name": "not_an_event", "value": 1}},
        {"source": "tail-probe", "type": "event", "data": {"level": "info", "message": "hello from the probe"}, "context": {"job_id": "job-tail-1"}},
        {"source": "tail-probe", "type": "event", "data": {"level": "error", "message": "<script>alert(1)</script>"}},
    ])
    lines = page.locator("#tail-log li")
    expect(lines).to_have_count(2)
    expect(lines.first).to_contain_text("hello from the probe")
    expect(lines.first.get_by_role("link", name="job-tail-1")).to_be_visible()
    expect(lines.nth(1)).to_contain_text("<script>alert(1)</script>")
    expect(page.locator("#tail-state")).to_contain_text("2 received")
    screenshot(page, "live-tail.png")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#tail-state")).to_have_attribute("data-state", "stopped")
    expect(page.get_by_role("button", name="Start")).to_be_enabled()


def test_the_routing_table_and_backend_health(page, sidecar):
    page.get_by_role("link", name="Routing").click()
    rule = page.locator("#routes-body tr").first
    expect(rule).to_contain_text("files")
    expect(rule.locator("td").last).to_have_text(re.compile(r"sidecar\.yaml:6$"))
    screenshot(page, "routing.png")
    page.get_by_role("link", name="Backends").click()
    backend = page.locator("#backends-body tr[data-backend=files]")
    expect(backend.locator(".badge")).to_have_text("closed")
    expect(backend.locator("td").nth(4)).not_to_have_text("0")  # delivered
    assert_readable(page)
    screenshot(page, "backends.png")


def test_the_dark_theme_follows_the_system_and_the_toggle(page, sidecar):
    page.emulate_media(color_scheme="dark")
    page.goto(f"http://127.0.0.1:{sidecar.http_port}/#job=job-import-7781")
    page.reload()
    html = page.locator("html")
    expect(html).to_have_attribute("data-theme", "dark")
    expect(page.locator("#waterfall-sources tr.row-source")).to_have_count(2)
    expect(page.locator("body")).to_have_css("background-color", "rgb(13, 17, 23)")
    toggle = page.get_by_role("button", name="Dark theme")
    expect(toggle).to_have_attribute("aria-pressed", "true")
    assert_readable(page)
    screenshot(page, "job-failed-dark.png")
    page.goto(f"http://127.0.0.1:{sidecar.http_port}/#job=job-12345")
    expect(waterfall_rows(page)).to_have_count(3)
    assert_readable(page)
    screenshot(page, "job-view-dark.png")

    toggle.click()  # an explicit choice beats the system preference, and is remembered
    expect(html).to_have_attribute("data-theme", "light")
    expect(page.locator("body")).to_have_css("background-color", "rgb(255, 255, 255)")
    page.reload()
    expect(html).to_have_attribute("data-theme", "light")
    toggle.focus()
    page.keyboard.press("Enter")
    expect(html).to_have_attribute("data-theme", "dark")


TOKEN = "web-page-t0ken"
TOKEN_CONFIG = FILES_CONFIG + "http: {{max_page_items: 2}}\n"


@pytest.fixture(scope="module")
def token_sidecar(tmp_path_factory):
    """A sidecar whose /api needs a token, and whose views come two spans to a page."""
    workdir = tmp_path_factory.mktemp("web-token")
    process = SidecarProcess(workdir, TOKEN_CONFIG.format(base=workdir / "out"), env={"MONITORING_SIDECAR_TOKEN": TOKEN}).start()
    try:
        sent = seed_job() + failed_job()
        process.send(sent)
        process.wait_for(lambda s: s["received"] == len(sent), what="the jobs received")
        yield process
    finally:
        assert process.stop() == 0


def test_with_a_token_the_page_asks_for_it_once_and_keeps_it_for_the_tab(browser_context, token_sidecar):
    page = browser_context.new_page()
    problems = []
    # The browser reports each refused request (the 401s that make the page ask) on its console.
    page.on("console", lambda m: m.type == "error" and "status of 401" not in m.text and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        page.goto(f"http://127.0.0.1:{token_sidecar.http_port}/")
        form = page.locator("#token-form")
        expect(form).to_be_visible()
        expect(page.locator("#token-note")).to_contain_text("monitoring-sidecar token")
        expect(page.get_by_label("Bearer token")).to_be_focused()
        page.get_by_label("Bearer token").fill("not-the-token")
        page.get_by_role("button", name="Use this token").click()
        expect(page.locator("#token-note")).to_contain_text("was refused")
        expect(form).to_be_visible()
        page.get_by_label("Bearer token").fill(TOKEN)
        page.get_by_role("button", name="Use this token").click()
        expect(form).to_be_hidden()
        expect(page.locator("#jobs-body tr").filter(has_text="job-12345")).to_have_count(1)
        assert page.evaluate("sessionStorage.getItem('sidecar-token')") == TOKEN
        screenshot(page, "token-accepted.png")

        # Two spans to a page: the waterfall says so and pages on.
        # Two to a page: the seed's job has three services, and so a second page with the third.
        page.get_by_role("link", name="job-12345", exact=True).click()
        expect(page.locator("#spans-pager")).to_contain_text("Page 1 of 2: spans 1–2 of 2, services 1–2 of 3")
        expect(waterfall_rows(page).locator(".label")).to_have_text(["file-receiver", "queue-service"])
        page.get_by_role("button", name="Next page").click()
        expect(page.locator("#spans-pager")).to_contain_text("Page 2 of 2: no spans (of 2), services 3–3 of 3")
        expect(waterfall_rows(page).locator(".label")).to_have_text(["db-loader"])
        page.goto(f"http://127.0.0.1:{token_sidecar.http_port}/#job=job-import-7781")
        expect(page.locator("#timeline h2")).to_have_text("Job job-import-7781")
        expect(page.locator("#waterfall-spans tr.row-span")).to_have_count(2)
        expect(page.locator("#spans-pager")).to_have_count(0)  # one page: no pager
        expect(form).to_be_hidden()  # a reload of the page keeps the tab's token

        # The tail and the reload send it too; the reload as JSON.
        page.get_by_role("link", name="Live tail").click()
        page.get_by_role("button", name="Start").click()
        expect(page.locator("#tail-state")).to_have_attribute("data-state", "open")
        token_sidecar.send([{"source": "tail-with-token", "type": "event", "data": {"level": "info", "message": "seen through the token"}}])
        expect(page.locator("#tail-log li")).to_contain_text(["seen through the token"])
        page.get_by_role("button", name="Stop").click()
        page.get_by_role("link", name="Routing").click()
        page.get_by_role("button", name="Reload configuration now").click()
        expect(page.locator("#routes-note")).to_have_text("Configuration reloaded.")
        token_sidecar.wait_for(lambda s: s["reloads"] == 1, what="the reload")
    finally:
        page.close()
    assert problems == []


def test_a_job_of_more_spans_than_a_page_pages_through_its_spans(browser_context, token_sidecar):
    spans = [message("job-many", "8" * 32, "worker", n, "span", {"name": f"step-{n}", "phase": "start"}, span=f"{n + 1:016x}") for n in range(5)]
    token_sidecar.send(spans)
    token_sidecar.wait_for(lambda s: s["correlator"]["index"]["jobs"] == 3, what="the job indexed")
    page = browser_context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{token_sidecar.http_port}/")
        page.evaluate(f"sessionStorage.setItem('sidecar-token', {TOKEN!r})")
        page.goto(f"http://127.0.0.1:{token_sidecar.http_port}/#job=job-many")
        pager = page.locator("#spans-pager")
        expect(pager).to_contain_text("Page 1 of 3: spans 1–2 of 5")
        expect(page.locator("#waterfall-spans tr.row-span .label")).to_have_text(["step-0", "step-1"])
        expect(page.get_by_role("button", name="Previous page")).to_be_disabled()
        page.get_by_role("button", name="Next page").click()
        expect(pager).to_contain_text("Page 2 of 3: spans 3–4 of 5")
        expect(page.locator("#waterfall-spans tr.row-span .label")).to_have_text(["step-2", "step-3"])
        page.get_by_role("button", name="Next page").click()
        expect(page.locator("#waterfall-spans tr.row-span .label")).to_have_text(["step-4"])
        expect(page.get_by_role("button", name="Next page")).to_be_disabled()
        expect(page.locator("#waterfall-spans tr.group")).to_have_text("Spans (5)")
    finally:
        page.close()
