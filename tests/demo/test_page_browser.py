"""The live page in a real headless browser (Debian's chromium driven through chromedriver).

The page's own traffic (four workers writing rows) runs while the test presses "Restart the
database"; a screenshot is taken during the outage. Then "Fail over", "Rebuild the standby" and
"Chaos mix": through all of them the page's "failed requests" stay 0 (the transaction runner runs
a cut write again). Set ``DEMO_SCREENSHOT=docs/demo-outage.png`` to keep the pictures (that is how
the docs' pictures are made).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import in_ci
from .helpers import ROOT, DemoProcess, demo_process

pytestmark = [pytest.mark.db, pytest.mark.browser]

WORKERS = 4  # the page's traffic workers (index.html)
DOWN_FOR = "5"


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        message = (
            f"browser test needs Debian's chromium and chromium-driver (missing: {missing}); "
            "bash scripts/test.sh installs them as root"
        )
        if in_ci():
            pytest.fail(message + " (CI is set, so this fails instead of skipping)", pytrace=False)
        pytest.skip(message)
    try:
        import selenium  # noqa: F401
    except ImportError:
        if in_ci():
            raise
        pytest.skip("selenium is not installed (the test extra)")
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[object]:
    chromium, chromedriver = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="demo-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _number(text: str) -> int:
    digits = "".join(ch for ch in text.split(" ")[0] if ch.isdigit())
    return int(digits) if digits else 0


def test_page_shows_the_pool_riding_through_a_restart(browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert isinstance(browser, WebDriver)
    driver = browser

    def text(element_id: str) -> str:
        return str(driver.find_element(By.ID, element_id).text)

    def wait_for(condition: object, timeout: float, what: str) -> None:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(
            lambda _: condition(),  # type: ignore[operator]
            message=f"page never showed: {what}",
        )

    with demo_process() as demo:
        driver.get(demo.base_url + "/")
        assert driver.title == "fault_tolerant_pool demo"
        wait_for(lambda: text("db-state") == "running", 20, "database running")
        wait_for(lambda: _number(text("traffic-ok")) >= 20, 20, "the page's writes succeeding")
        assert "FaultTolerantAsyncQueuePool" in text("pool-desc")
        assert _number(text("failures")) == 0
        if os.environ.get("DEMO_SCREENSHOT"):
            time.sleep(25)  # for the docs' picture: some calm history before the outage

        Select(driver.find_element(By.ID, "down-for")).select_by_visible_text(DOWN_FOR)
        driver.find_element(By.ID, "restart").click()
        wait_for(lambda: text("db-state") in ("stopping", "down"), 10, "database down")
        restart_clicked = time.monotonic()
        ok_at_restart = _number(text("traffic-ok"))
        # While down: the page's requests wait (none is answered), failed attempts are counted.
        wait_for(lambda: "waiting" in text("traffic-inflight"), 10, "requests waiting")
        wait_for(lambda: _number(text("failures")) > 0, 10, "failed connect attempts")
        time.sleep(max(0.0, restart_clicked + 2.5 - time.monotonic()))  # let the charts draw it
        assert text("db-state") == "down", "the screenshot must show the outage"
        shot = tmp_path / "demo-outage.png"
        assert driver.save_screenshot(str(shot))
        ok_while_down = _number(text("traffic-ok"))

        wait_for(lambda: text("db-state") == "running", 30, "database running again")
        wait_for(lambda: _number(text("traffic-ok")) >= ok_while_down + 20, 30, "later writes")
        # Every write was answered 2xx: held while it was down, or cut and run again.
        assert _number(text("traffic-failed")) == 0 and _number(text("failed")) == 0
        assert ok_while_down - ok_at_restart <= WORKERS, "nothing was answered while it was down"
        assert _number(text("requests-503")) <= 1  # the page's row counter may have met the stop
        actions = text("actions")
        assert re.search(
            r"Restart 1: fast shutdown accepting connections \d+\.\d+ s after", actions
        )
        failover_shot = fail_over_and_rebuild(driver, demo, text, wait_for, tmp_path)
        chaos_shot = chaos_mix(driver, text, wait_for, tmp_path)
        errors = [
            entry["message"]
            for entry in driver.get_log("browser")  # type: ignore[no-untyped-call]
            if entry["level"] == "SEVERE" and "status of 503" not in entry["message"]
        ]
        assert not errors, errors
        assert demo.stop(signal.SIGINT) == 0, demo.output

    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    if target := os.environ.get("DEMO_SCREENSHOT"):
        path = Path(target) if os.path.isabs(target) else ROOT / target
        path.write_bytes(data)
        path.with_name("demo-failover.png").write_bytes(failover_shot.read_bytes())
        path.with_name("demo-chaos.png").write_bytes(chaos_shot.read_bytes())


def fail_over_and_rebuild(
    driver: Any, demo: DemoProcess, text: Any, wait_for: Any, tmp_path: Path
) -> Path:
    """Press "Fail over": the writes move to the standby's port; then "Rebuild the standby"."""
    from selenium.webdriver.common.by import By

    primary = int(re.search(r"127\.0\.0\.1:(\d+) ", demo.banner_value("database")).group(1))  # type: ignore[union-attr]
    standby = int(re.search(r"127\.0\.0\.1:(\d+) ", demo.banner_value("standby")).group(1))  # type: ignore[union-attr]
    wait_for(lambda: text("writes-on").startswith(f"127.0.0.1:{primary} "), 10, "writes on primary")
    assert "pg_is_in_recovery() = false" in text("writes-on")
    # The page's reads land on the standby (a ReplicaRouter), and move to the writer once the
    # standby is promoted; the rebuilt standby takes them again.
    wait_for(lambda: text("reads-on") == f"127.0.0.1:{standby} (a standby)", 10, "reads on standby")
    failed_before = _number(text("traffic-failed"))
    button = driver.find_element(By.ID, "failover")
    assert button.text == "Fail over"
    button.click()
    wait_for(lambda: text("writes-on").startswith(f"127.0.0.1:{standby} "), 20, "writes moved")
    wait_for(lambda: text("failover") == "Rebuild the standby", 10, "the rebuild button")
    wait_for(lambda: "demoted" in text("servers") and "true" in text("servers"), 10, "roles")
    assert text("writer-port") == f"127.0.0.1:{standby}"
    wait_for(lambda: text("reads-on").startswith("the writer"), 10, "reads on the writer")
    assert "no server is a standby" in text("reads-writer")
    time.sleep(1.5)  # some writes on the new primary in the table and the charts
    shot = tmp_path / "demo-failover.png"
    driver.set_window_size(1400, 1350)  # the servers' table below the charts, too
    assert driver.save_screenshot(str(shot))
    driver.set_window_size(1400, 1000)
    # The writes that met the demoted writer (SQLSTATE 25006) were run again on the new primary:
    # the page shows them, and none failed.
    wait_for(lambda: _number(text("retries")) >= 1, 10, "writes run again")
    assert _number(text("traffic-failed")) == failed_before == 0
    rows = {line.split()[0]: line for line in text("servers").splitlines()[1:]}
    assert rows[f"127.0.0.1:{standby}"].split()[1:3] == ["primary", "false"]
    assert rows[f"127.0.0.1:{primary}"].split()[1:4] == ["demoted", "false", "true"]

    driver.find_element(By.ID, "failover").click()  # the second click rebuilds the standby
    wait_for(lambda: text("failover") == "Fail over", 30, "the standby rebuilt")
    wait_for(lambda: f"127.0.0.1:{primary} standby true" in text("servers"), 10, "it replicates")
    assert text("writes-on").startswith(f"127.0.0.1:{standby} ")
    wait_for(lambda: text("reads-on") == f"127.0.0.1:{primary} (a standby)", 10, "reads back")
    assert _number(text("reads-failed")) == 0 and _number(text("reads-ok")) > 0
    return shot


def chaos_mix(driver: Any, text: Any, wait_for: Any, tmp_path: Path) -> Path:
    """Press "Chaos mix" (steps 3 s apart): each step shows up in the log of actions, and the
    page's writes all get their 2xx."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ok_before = _number(text("traffic-ok"))
    Select(driver.find_element(By.ID, "chaos-pause")).select_by_visible_text("3")
    driver.find_element(By.ID, "chaos").click()
    wait_for(lambda: "chaos mix" in text("db-state"), 10, "the chaos mix under way")
    assert driver.find_element(By.ID, "restart").get_attribute("disabled"), "one action at a time"
    wait_for(lambda: "step 1/4" in text("actions"), 10, "the first step in the log")
    wait_for(lambda: "step 4/4" in text("actions") and text("chaos") == "Chaos mix", 60,
             "the chaos mix done")  # fmt: skip
    actions = text("actions")
    for step in ("terminate every client session (pg_terminate_backend)",
                 "fast restart, down 2 s", "crash: immediate stop",
                 "terminate every client session again"):  # fmt: skip
        assert step in actions, actions
    assert "sessions terminated" in actions and "failed:" not in actions, actions
    wait_for(lambda: _number(text("traffic-ok")) >= ok_before + 20, 30, "writes after the chaos")
    shot = tmp_path / "demo-chaos.png"
    assert driver.save_screenshot(str(shot))
    assert _number(text("traffic-failed")) == 0 and _number(text("failed")) == 0
    assert _number(text("reads-failed")) == 0
    return shot
