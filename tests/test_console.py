"""The web console (/ui) driven in headless Chromium through Selenium: sign in with the keyboard,
submit a tiny pretraining job through the form (after one refused with errors shown under the
fields they name), watch it reach SUCCEEDED, its loss curve, log, artifacts (one downloaded and
compared byte for byte), its report in a sandboxed frame, the job list refreshing by itself and
filtering, the stop button, and another tenant's job shown as not found. Along the way: the token
is in no URL the browser asked for, no cookie is set, and every page has a strict CSP.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them when it can) and
selenium (the dev extra). `RAYLM_CONSOLE_SCREENSHOTS=docs` also writes docs/console-*.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from service.client import Client

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: `pip install -e '.[dev]'` "
                                "(make test does it); THE WEB CONSOLE IS NOT TESTED")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

PAGES = ("/ui", "/ui/signin", "/ui/submit", "/ui/jobs/j0123456789abcdef")
SHOTS = os.environ.get("RAYLM_CONSOLE_SCREENSHOTS")

FORM_JOB = """\
kind: pretrain
data: console-prep
output: console-run
model:
  preset: tiny
  n_layers: 1
  d_model: 64
  n_heads: 2
  n_kv_heads: 1
  d_ff: 128
  max_seq_len: 32
num_workers: 1
zero_stage: 0
global_batch_size: 4
micro_batch_size: 4
max_steps: 6
warmup_steps: 1
eval_every: 3
eval_batches: 1
checkpoint_every: 6
lr: 0.001
"""


def find_browser() -> tuple[str, str]:
    chrome = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None)
    if not (chrome and driver):
        pytest.skip("NO HEADLESS CHROMIUM: install Debian's chromium and chromium-driver (`make test` does when it "
                    "can run apt-get); THE WEB CONSOLE IS NOT TESTED")
    return chrome, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    chrome, driver_path = find_browser()
    downloads = tmp_path_factory.mktemp("downloads")
    o = webdriver.ChromeOptions()
    o.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
              "--disable-extensions", "--no-first-run", "--lang=en-GB"):
        o.add_argument(a)
    o.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                        "download.prompt_for_download": False})
    o.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    d = webdriver.Chrome(options=o, service=Service(driver_path))
    d.set_page_load_timeout(60)
    d.downloads = downloads
    yield d
    d.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the browser asked for since the last call (Chrome's performance log)."""
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            out.append(msg["params"]["request"]["url"])
    return out


def wait(driver, cond, timeout=30, what=""):
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: cond(d))
    except TimeoutException:
        raise AssertionError(f"timed out: {what}; {page_state(driver)}") from None


def page_state(d) -> str:
    """What the page says, for a failure's message."""
    said = {css: e[0].text[-1500:] for css in ("#signin-error", "#submit-status", "#kind-errors", "#spec-errors",
                                               "#job-error", "#job-status", "#log", "#jobs-error")
            if (e := d.find_elements(By.CSS_SELECTOR, css)) and e[0].text}
    return f"at {d.current_url}: {said}"


def text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def shot(driver, name: str, scroll_to: str | None = None) -> None:
    """docs/console-<name>.png when RAYLM_CONSOLE_SCREENSHOTS is set: the page from its top (or
    from `scroll_to`), up to 1500 px of it, as a 128-colour PNG (small)."""
    if not SHOTS:
        return
    from PIL import Image

    path = Path(SHOTS) / f"console-{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, min(max(height, 700), 1500) if not scroll_to else 1000)
    if scroll_to:
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", scroll_to)
    else:
        driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.set_window_size(1200, 900)
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)


def test_csp_and_headers_on_every_page(api):
    for path in (*PAGES, "/ui/static/console.js"):
        r = httpx.get(api.url + path)
        assert r.status_code == 200, path
        csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
        assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"], (path, csp)
        assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"], path
        assert csp["base-uri"] == ["'none'"] and csp["form-action"] == ["'none'"], path
        assert csp["connect-src"] == ["'self'"], path
        # inline styles only where the sandboxed report frame needs them (it inherits the page's policy)
        assert csp["style-src"] == (["'self'", "'unsafe-inline'"] if path.startswith("/ui/jobs/") else ["'self'"])
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
        assert "set-cookie" not in r.headers
        if path != "/ui/static/console.js":
            assert "<script>" not in r.text and not re.search(r"\son[a-z]+\s*=", r.text)  # no inline script or handlers
    assert httpx.get(api.url + "/ui/static/../main.py").status_code == 404
    assert httpx.get(api.url + "/ui/jobs/%3Cscript%3E").status_code == 422  # ids are [A-Za-z0-9_-]


def test_console_end_to_end(api, workspace, browser, tmp_path):
    t0 = time.monotonic()
    ws, tokens = workspace["dir"], workspace["tokens"]
    alice = Client(api.url, tokens["alice"], timeout=120)
    bob = Client(api.url, tokens["bob"], timeout=120)
    prep = alice.submit({"kind": "prepare", "inputs": [str(ws / "alice" / "play.md")], "output": "console-prep",
                         "markdown_split_level": 3, "vocab_size": 300, "seq_len": 32, "num_shards": 1,
                         "val_fraction": 0.1})
    bob_job = bob.submit({"kind": "prepare", "inputs": ["missing.md"], "output": "never"})
    d, url = browser, api.url

    # --- sign in with the keyboard: the token field has the focus; a wrong token is refused
    d.get(url + "/ui")
    wait(d, lambda d: d.current_url == url + "/ui/signin", what="sent to sign in")
    assert d.switch_to.active_element.get_attribute("id") == "token"
    assert_labelled(d)
    d.switch_to.active_element.send_keys("not-a-token", Keys.ENTER)
    wait(d, lambda d: "not known" in text(d, "#signin-error"), what="wrong token refused")
    assert d.find_element(By.ID, "token").get_attribute("aria-invalid") == "true"
    field = d.switch_to.active_element
    assert field.get_attribute("id") == "token"  # the focus goes back to the field
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(tokens["alice"], Keys.ENTER)
    wait(d, lambda d: d.current_url == url + "/ui", what="signed in")
    wait(d, lambda d: text(d, "#who") == "tenant alice", what="tenant shown")
    wait(d, lambda d: prep.id in text(d, "#jobs-table"), what="the prepare job listed")
    assert alice.wait(prep.id, timeout=600) == "SUCCEEDED"

    # --- submit through the form, keyboard only: a refused spec first, errors under the fields
    d.get(url + "/ui/submit")
    assert_labelled(d)
    shot_form = FORM_JOB.replace("zero_stage: 0", "zero_stage: 5").replace("d_model: 64", "d_model: lots")
    spec = d.find_element(By.ID, "spec")
    spec.click()
    spec.send_keys(shot_form)
    tab_to(d, "Submit").send_keys(Keys.ENTER)
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#spec-errors li")) >= 2, what="field errors shown")
    errors = {li.find_element(By.CSS_SELECTOR, "code").text: li.text
              for li in d.find_elements(By.CSS_SELECTOR, "#spec-errors li")}
    lines = FORM_JOB.splitlines()
    assert f"line {lines.index('zero_stage: 0') + 1}" in errors["zero_stage"], errors
    assert f"line {lines.index('  d_model: 64') + 1}" in errors["model.d_model"], errors
    assert spec.get_attribute("aria-invalid") == "true"
    assert "zero_stage" in text(d, "#submit-status")  # announced (role=status, aria-live)
    assert not alice.list(kind="pretrain").items  # nothing was submitted
    shot(d, "submit-errors")
    # each error's "line N" is a button after the field: Enter puts the cursor on that line
    spec.send_keys(Keys.TAB)
    assert d.switch_to.active_element.text == f"line {lines.index('zero_stage: 0') + 1}"
    d.switch_to.active_element.send_keys(Keys.ENTER)
    assert d.switch_to.active_element.get_attribute("id") == "spec"
    assert d.execute_script("const t = arguments[0]; return t.value.slice(t.selectionStart, t.selectionEnd)",
                            spec) == "zero_stage: 5"
    spec.send_keys(Keys.CONTROL, "a")
    spec.send_keys(Keys.DELETE)
    spec.send_keys(FORM_JOB)
    tab_to(d, "Submit").send_keys(Keys.ENTER)
    wait(d, lambda d: "/ui/jobs/" in d.current_url, what="sent to the job page")
    job_id = d.current_url.rsplit("/", 1)[1]
    job = alice.get(job_id)
    assert job.kind == "pretrain" and job.spec["output"] == str(ws / "alice" / "console-run")

    # --- the job page follows it to the end
    wait(d, lambda d: text(d, "#job-status") in ("SUCCEEDED", "FAILED", "STOPPED"), timeout=600,
         what="job ended")
    assert text(d, "#job-status") == "SUCCEEDED", text(d, "#log")[-3000:]
    assert d.find_elements(By.CSS_SELECTOR, "#job-status .status-succeeded")
    run = ws / "alice" / "console-run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [m["step"] for m in metrics if "loss" in m]
    val_steps = [m["step"] for m in metrics if "val_loss" in m]
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#loss-chart polyline[data-series=val_loss]"), what="val curve")
    curve = d.find_element(By.CSS_SELECTOR, "#loss-chart polyline[data-series=loss]")
    points = [tuple(map(float, p.split(","))) for p in curve.get_attribute("points").split()]
    assert len(points) == len(train_steps) == 6 and len(set(points)) == len(points)
    assert all(a[0] < b[0] for a, b in zip(points, points[1:]))  # steps left to right
    val = d.find_element(By.CSS_SELECTOR, "#loss-chart polyline[data-series=val_loss]")
    assert int(val.get_attribute("data-count")) == len(val_steps) >= 2
    assert d.find_element(By.CSS_SELECTOR, "#loss-chart svg").get_attribute("aria-label").startswith("Loss by step")
    wait(d, lambda d: "final val loss" in text(d, "#log"), what="log shown")
    assert "console-run" in text(d, "#config") and "zero_stage: 0" in text(d, "#config")
    assert d.find_element(By.ID, "stop").get_attribute("disabled")  # an ended job cannot be stopped

    # times in the browser's time zone, sizes in human units
    created = d.find_element(By.CSS_SELECTOR, "#job-created time")
    assert created.get_attribute("datetime").startswith(time.strftime("%Y-%m-%d", time.gmtime(job.timings.created_at)))
    sizes = [td.text for td in d.find_elements(By.CSS_SELECTOR, "#artifacts td.num") if td.text != "–"]
    assert sizes and all(s.split()[-1] in ("B", "KiB", "MiB", "GiB") for s in sizes), sizes

    # --- download an artifact through the page: the same bytes as the file
    button = d.find_element(By.CSS_SELECTOR, "button.download[data-path='loss.png']")
    button.send_keys(Keys.ENTER)  # a keyboard press on a native button
    target = browser.downloads / "loss.png"
    wait(d, lambda d: target.exists() and target.stat().st_size == (run / "loss.png").stat().st_size, what="download")
    assert target.read_bytes() == (run / "loss.png").read_bytes()

    # --- the report, in a frame that runs no script and has no origin of ours
    wait(d, lambda d: d.find_element(By.ID, "report").is_displayed(), timeout=120, what="report shown")
    frame = d.find_element(By.ID, "report")
    assert frame.get_attribute("sandbox") == ""
    shot(d, "job")
    shot(d, "report", "#h-report")
    d.switch_to.frame(frame)
    assert d.find_element(By.TAG_NAME, "h1").text == "raylm report"
    assert d.find_elements(By.CSS_SELECTOR, "svg")  # its charts
    assert d.execute_script("return window.origin") == "null"
    d.switch_to.default_content()

    # --- the job list: filters, and it refreshes by itself
    d.get(url + "/ui")
    wait(d, lambda d: job_id in text(d, "#jobs-table"), what="job listed")
    shot(d, "jobs")
    Select(d.find_element(By.ID, "f-kind")).select_by_value("prepare")
    wait(d, lambda d: job_id not in text(d, "#jobs-table") and prep.id in text(d, "#jobs-table"), what="filtered")
    Select(d.find_element(By.ID, "f-kind")).select_by_value("")
    long = alice.submit({**json_spec(ws), "max_steps": 100_000, "output": "console-long"})
    wait(d, lambda d: long.id in text(d, "#jobs-table"), timeout=15, what="a new job appears without a reload")

    # --- the stop button
    d.find_element(By.LINK_TEXT, long.id).click()
    wait(d, lambda d: d.find_element(By.ID, "stop").is_enabled(), what="stop enabled")
    d.find_element(By.ID, "stop").click()
    wait(d, lambda d: text(d, "#job-status") == "STOPPED", timeout=180, what="stopped")

    # --- another tenant's job, and a job that does not exist: not found
    for other in (bob_job.id, "j0000000000000000"):
        d.get(f"{url}/ui/jobs/{other}")
        wait(d, lambda d: "not found" in text(d, "#job-error"), what="not found")
        assert not d.find_element(By.ID, "job-body").is_displayed()
    assert bob.get(bob_job.id).id == bob_job.id  # it does exist, for bob

    # --- sign out: the token is gone from the tab
    d.get(url + "/ui")
    d.find_element(By.ID, "signout").click()
    wait(d, lambda d: d.current_url == url + "/ui/signin", what="signed out")
    assert d.execute_script("return sessionStorage.length") == 0

    # --- the token was never in a URL, never in a cookie; the page never logged an error
    urls = requested_urls(d)
    assert any("/v1/jobs" in u for u in urls) and any("/ui/static/console.js" in u for u in urls)
    assert not [u for u in urls if tokens["alice"] in u or "token" in u.lower()]
    assert d.get_cookies() == []
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "Content Security Policy" in e["message"]]
    assert not severe, severe  # nothing of the console's own was blocked by its CSP
    assert alice.get(long.id).status == "STOPPED"

    # --- the report route: another tenant gets 404; a job without report.html gets one built
    # from its files, served sandboxed
    for path in ("report", "metrics"):
        r = httpx.get(f"{url}/v1/jobs/{job_id}/{path}", headers={"Authorization": f"Bearer {tokens['bob']}"})
        assert r.status_code == 404
    (run / "report.html").unlink()
    r = httpx.get(f"{url}/v1/jobs/{job_id}/report", headers={"Authorization": f"Bearer {tokens['alice']}"},
                  timeout=120)
    assert r.status_code == 200 and "<h1>raylm report</h1>" in r.text and "console-run" in r.text
    assert r.headers["content-security-policy"].startswith("sandbox;") and "<script" not in r.text
    # the CLI picks the same files (jobs.report.files.report_inputs) and builds the same sections
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "cli-report.html"
    cli = CliRunner().invoke(app, ["report", job_id, "--output", str(out)],
                             env={"RAYLM_URL": url, "RAYLM_TOKEN": tokens["alice"]}, catch_exceptions=False)
    assert cli.exit_code == 0, cli.output
    for page in (r.text, out.read_text()):
        assert page.count('data-status="not checked"') == 1  # the one checkpoint, listed, not verified
        assert "<h2" in page and "Pretraining" in page and "6 records from" in page
    print(f"console end to end: {time.monotonic() - t0:.0f} s")


def test_metric_series_thins_and_keeps_every_eval(tmp_path):
    from service.records import metric_series

    recs = [{"step": s, "loss": 10 / s, "lr": 1e-3, "phase": "warm"} for s in range(1, 5001)]
    for r in recs[99::100]:
        r["val_loss"] = r["loss"] + 0.1
    recs[0]["loss"] = float("nan")
    lines = [json.dumps(r) for r in recs]
    lines.insert(5, "{not json")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    m = metric_series(str(tmp_path / "run"), [str(tmp_path)], 100)
    assert m.total == 5000 and not m.truncated
    steps = [r["step"] for r in m.records]
    assert steps == sorted(steps) and steps[-1] == 5000 and steps[0] == 1
    evals = [r for r in m.records if "val_loss" in r]
    assert [r["step"] for r in evals] == list(range(100, 5001, 100))  # every evaluation kept
    assert len(m.records) - len(evals) <= 100
    assert all("phase" not in r for r in m.records) and not any(r.get("loss") != r.get("loss") for r in m.records)
    assert m.records[0].keys() == {"step", "lr"}  # the NaN dropped, not the record
    # a metrics.jsonl that is a link out of the output is not read
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").symlink_to(tmp_path / "run" / "metrics.jsonl")
    assert metric_series(str(tmp_path / "other"), [str(tmp_path / "other")], 100).records == []


def json_spec(ws: Path) -> dict:
    import yaml

    return {**yaml.safe_load(FORM_JOB), "data": str(ws / "alice" / "console-prep")}


def tab_to(d, label: str, most: int = 8):
    """Press Tab until the focus is on the control showing `label` (at most `most` presses)."""
    for _ in range(most):
        d.switch_to.active_element.send_keys(Keys.TAB)
        if d.switch_to.active_element.text == label:
            return d.switch_to.active_element
    raise AssertionError(f"{label!r} is not reachable with Tab")


def assert_labelled(d) -> None:
    """Every form control has a <label for> naming it."""
    controls = d.find_elements(By.CSS_SELECTOR, "input, select, textarea")
    assert controls
    for c in controls:
        labels = d.find_elements(By.CSS_SELECTOR, f"label[for='{c.get_attribute('id')}']")
        assert labels and labels[0].text.strip(), c.get_attribute("outerHTML")
