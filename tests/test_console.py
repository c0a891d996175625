"""The web console (server/console) in a real browser: Playwright driving Debian's
chromium against a real server with real kernels, the API key set.

One server and one browser for the module; each test opens its own pages. Screenshots
go to test-artifacts/console/ (not committed). Without chromium or Playwright the module
skips, unless ERA_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.support.era_server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "console"
KEY = "console-test-key-7f3a"
WAIT_MS = 20_000


def chromium_executable() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def require_browser() -> str:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "Playwright is not installed (pip install -e '.[test]')"
    path = chromium_executable()
    if problem is None and path is None:
        problem = "chromium is not installed (apt-get install chromium; scripts/setup.sh --test does it as root)"
    if problem is not None:
        if os.environ.get("ERA_REQUIRE_BROWSER") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_API_KEY": KEY, "ERA_MAX_BODY": str(4 * 1024 * 1024)}).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def browser():
    executable = require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


def keyed_context(browser, server):
    """A browser context whose tabs already hold the key (as after the prompt)."""
    context = browser.new_context(base_url=server.base, viewport={"width": 1280, "height": 800}, accept_downloads=True)
    # Init scripts run in every frame; in the sandboxed output frames storage throws.
    context.add_init_script(f"try {{ sessionStorage.setItem('era.apiKey', {json.dumps(KEY)}); }} catch (e) {{}}")
    context.set_default_timeout(WAIT_MS)
    watch_errors(context)
    return context


PAGE_ERRORS: dict[int, list[str]] = {}  # id(context) -> its pages' errors


def watch_errors(context):
    """Collect the pages' uncaught exceptions and console errors (checked by close())."""
    errors = PAGE_ERRORS[id(context)] = []
    context.on("page", lambda page: (page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}")),
                                     page.on("console", lambda msg: errors.append(f"console: {msg.text}")
                                             if msg.type == "error" else None)))


def close(context, allowed=()):
    """Close the context; its pages must have logged no error but those ``allowed`` match."""
    errors = [e for e in PAGE_ERRORS.pop(id(context)) if not any(re.search(pattern, e) for pattern in allowed)]
    context.close()
    assert errors == []


def api(server, method, path, body=None, expect=200):
    return server.json(method, path, body, headers={"Authorization": f"Bearer {KEY}"}, expect=expect)


def open_session(context, sid, tab="console"):
    page = context.new_page()
    page.goto(f"/#/session/{sid}/{tab}")
    page.wait_for_function("window.eraConsole !== undefined")
    if tab == "console":
        page.locator(".CodeMirror").wait_for()
        page.locator("#socket-state", has_text="live").wait_for()
    return page


def run_code(page, code):
    """Type into the editor and press Shift+Enter, as a person would."""
    page.locator(".CodeMirror").click()
    page.evaluate("code => document.querySelector('.CodeMirror').CodeMirror.setValue(code)", code)
    page.keyboard.press("Shift+Enter")


def last_cell(page):
    return page.locator(".cells .cell").last


@pytest.fixture(scope="module")
def session_id(server):
    """A python session shared by the tests that only run code in it."""
    doc = api(server, "POST", "/api/sessions", {"language": "python", "id": "console-shared"}, expect=201)
    return doc["id"]


def test_page_is_served_with_a_strict_policy(server):
    status, headers, body = server.request_full("GET", "/")
    assert status == 200 and b'<script type="module" src="/console/app.js">' in body
    policy = headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["script-src"] == "'self'"  # no inline script, no eval
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, _ = server.request_full("GET", "/console/vendor/codemirror-5.65.21.min.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
    # The page needs no key; the API behind it does.
    assert server.request("GET", "/api/sessions")[0] == 401
    assert server.request("GET", "/console/../pyproject.toml")[0] in (403, 404)
    # Counted under one route label of their own, not as unmatched requests.
    _, metrics = server.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert 'route="/console",status="200"' in metrics.decode()


def test_wrong_key_says_so_and_the_right_one_is_kept_in_session_storage(browser, server):
    context = browser.new_context(base_url=server.base, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    watch_errors(context)
    page = context.new_page()
    page.goto("/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    page.fill("#key-input", "not-the-key")
    page.click("#key-submit")
    page.locator("#key-message", has_text="not accepted").wait_for()
    assert dialog.is_visible()
    page.screenshot(path=ARTIFACTS / "wrong-key.png")
    page.fill("#key-input", KEY)
    page.click("#key-submit")
    page.locator("#sessions-table").wait_for()
    dialog.wait_for(state="hidden")
    assert page.evaluate("sessionStorage.getItem('era.apiKey')") == KEY
    assert context.cookies() == [] and KEY not in page.url
    assert page.input_value("#key-input") == ""  # not shown again
    close(context, allowed=(r"status of 401",))


def test_create_a_session_run_print_and_a_plot(browser, server):
    context = keyed_context(browser, server)
    page = context.new_page()
    page.goto("/")
    page.select_option("#new-language", "python")
    page.fill("#new-id", "console-created")
    page.press("#new-id", "Enter")  # keyboard only, from here to the first output
    page.wait_for_url(re.compile(r"#/session/console-created"))
    page.locator("#socket-state", has_text="live").wait_for()
    page.locator(".CodeMirror-focused").wait_for()  # the editor has the focus
    page.keyboard.type("print(1)")
    page.keyboard.press("Shift+Enter")
    cell = last_cell(page)
    cell.locator(".cell-status", has_text="done").wait_for()
    assert cell.locator(".out-stdout").inner_text().strip() == "1"
    assert page.evaluate("document.querySelector('.CodeMirror').CodeMirror.getValue()") == ""
    run_code(page, "import matplotlib.pyplot as plt\nplt.figure(figsize=(5, 2.4))\nplt.plot([1, 3, 2, 4])\nplt.show()")
    image = last_cell(page).locator("img.out-image")
    image.wait_for(timeout=60_000)
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    page.wait_for_function("document.querySelector('img.out-image').naturalWidth > 100")
    run_code(page, "from IPython.display import JSON, display\ndisplay(JSON({'answer': [4, 2]}))")
    assert json.loads(last_cell(page).locator("pre.out-json").inner_text()) == {"answer": [4, 2]}
    page.locator(".CodeMirror").click()
    page.keyboard.type("def f(): return 'x'")  # highlighted as Python: keyword and string spans
    page.locator(".CodeMirror .cm-keyword", has_text="def").wait_for()
    page.locator(".CodeMirror .cm-string", has_text="'x'").wait_for()
    run_code(page, "1/0")
    error = last_cell(page).locator(".out-error")
    error.wait_for()
    assert "ZeroDivisionError" in error.inner_text()
    assert error.locator("span").count() > 0  # the traceback's ANSI colours, as styled spans
    page.set_viewport_size({"width": 1280, "height": 960})  # the whole console, for docs/console.png
    page.screenshot(path=ARTIFACTS / "console.png")
    page.set_viewport_size({"width": 1280, "height": 800})
    # The sessions list shows it, with its kernel state and the provisioner.
    page.goto("/#/")
    row = page.locator("tr[data-session-id='console-created']")
    row.wait_for()
    assert "python" in row.inner_text() and "local" in row.inner_text()
    page.set_viewport_size({"width": 420, "height": 800})  # a narrow window
    page.screenshot(path=ARTIFACTS / "sessions-narrow.png")
    close(context)


def test_two_pages_see_one_run_and_either_answers_input(browser, server, session_id):
    context = keyed_context(browser, server)
    first, second = open_session(context, session_id), open_session(context, session_id)
    second.set_viewport_size({"width": 420, "height": 800})  # the second page is a narrow window
    run_code(first, "print('from the first page')")
    seen = second.locator(".cells .cell.foreign .out-stdout", has_text="from the first page")
    seen.wait_for()
    second.locator(".cells .cell.foreign .cell-code", has_text="print('from the first page')").wait_for()
    run_code(first, "name = input('name? ')\nprint('hello', name)")
    second.locator(".cells .cell.foreign input.input-reply").last.fill("era")
    second.locator(".cells .cell.foreign input.input-reply").last.press("Enter")
    last_cell(first).locator(".out-stdout", has_text="hello era").wait_for()
    last_cell(second).locator(".out-stdout", has_text="hello era").wait_for()
    assert first.locator("input.input-reply").count() == 0  # the answered prompt is gone there too
    second.screenshot(path=ARTIFACTS / "console-narrow.png")
    close(context)


def test_upload_by_drop_and_download(browser, server, session_id):
    context = keyed_context(browser, server)
    page = open_session(context, session_id, tab="files")
    page.locator("#files-table").wait_for()
    page.evaluate("""() => {
        const transfer = new DataTransfer();
        transfer.items.add(new File(['dropped bytes \\u00e9'], 'dropped.txt', {type: 'text/plain'}));
        document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""")
    row = page.locator("#files-table tr[data-path='dropped.txt']")
    row.wait_for()
    status, body = server.request("GET", f"/api/sessions/{session_id}/files/dropped.txt",
                                  headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and body == "dropped bytes é".encode()
    with page.expect_download() as info:
        row.locator("button", has_text="Download").click()
    download = info.value
    assert download.suggested_filename == "dropped.txt"
    assert Path(download.path()).read_bytes() == "dropped bytes é".encode()
    page.screenshot(path=ARTIFACTS / "files.png")
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    row.locator("button", has_text="Delete").click()
    row.wait_for(state="detached")
    assert server.request("GET", f"/api/sessions/{session_id}/files/dropped.txt",
                          headers={"Authorization": f"Bearer {KEY}"})[0] == 404
    close(context)


def test_history_shows_stored_runs_and_downloads_the_notebook(browser, server, session_id):
    api(server, "POST", f"/api/sessions/{session_id}/run", {"code": "print('kept in history')"})
    context = keyed_context(browser, server)
    page = open_session(context, session_id, tab="history")
    page.locator("#history-list .cell .out-stdout", has_text="kept in history").wait_for()
    page.locator("#history-list .cell-code", has_text="print('kept in history')").wait_for()
    with page.expect_download() as info:
        page.click("#notebook-download")
    notebook = json.loads(Path(info.value.path()).read_text())
    assert info.value.suggested_filename == f"{session_id}.ipynb" and notebook["nbformat"] == 4
    assert any("kept in history" in "".join(cell.get("source", "")) for cell in notebook["cells"])
    close(context)


HOSTILE_HTML = """<p id="inside">inside the frame</p>
<img src="x" onerror="fetch('/api/hostile-probe-img')">
<script>
  let storage;
  try { storage = 'read: ' + sessionStorage.getItem('era.apiKey'); } catch (e) { storage = 'blocked'; }
  try { parent.eraPwned = 'ran'; } catch (e) {}
  try { top.eraPwned = 'ran'; } catch (e) {}
  try { parent.document.title = 'pwned'; } catch (e) {}
  fetch('/api/hostile-probe-script').catch(() => {});
  fetch(location.origin + '/api/hostile-probe-script').catch(() => {});
  new Image().src = '/api/hostile-probe-image';
  document.getElementById('inside').textContent = 'script ran in the frame; storage ' + storage;
</script>"""


def test_hostile_outputs_do_not_run_on_the_api_origin(browser, server, session_id):
    context = keyed_context(browser, server)
    page = open_session(context, session_id)
    stdout = "<img src=x onerror=\"window.eraPwned='stdout';fetch('/api/hostile-probe-stdout')\">"
    run_code(page, f"print({stdout!r})\n"
                   f"from IPython.display import display, HTML\ndisplay(HTML({HOSTILE_HTML!r}))\n"
                   "display({'text/html': '<b>raw</b><script>top.eraPwned=1</script>'}, raw=True)")
    cell = last_cell(page)
    cell.locator(".cell-status", has_text="done").wait_for()
    assert cell.locator(".out-stdout").inner_text().strip() == stdout  # shown as text
    assert cell.locator(".out-stdout img").count() == 0
    frames = cell.locator("iframe.out-html")
    assert frames.count() == 2
    for i in range(2):
        assert frames.nth(i).get_attribute("sandbox") == "allow-scripts"  # never allow-same-origin
    # Scripts do run in the frame (charts need them), just not with the page's powers.
    frame = page.frame_locator("iframe.out-html >> nth=0")
    frame.locator("#inside", has_text="script ran in the frame; storage blocked").wait_for()
    page.wait_for_timeout(500)  # time for anything that would reach the server to reach it
    assert page.evaluate("window.eraPwned") is None and page.title() == "ERA Kernel console"
    assert not any("hostile-probe" in str(entry.get("path", "")) for entry in server.logs())
    page.screenshot(path=ARTIFACTS / "hostile.png", full_page=True)
    close(context, allowed=(r"Content Security Policy", r"Failed to fetch", r"cross-origin frame"))


def test_terminal_tab_and_server_view(browser, server, session_id):
    context = keyed_context(browser, server)
    page = open_session(context, session_id, tab="terminal")
    page.locator("#terminal-state", has_text="connected").wait_for()
    page.locator(".xterm").click()
    page.keyboard.type("echo $((6*7))sum\n")
    page.locator(".xterm-rows", has_text="42sum").wait_for()
    page.goto("/#/server")
    page.locator("#server-numbers", has_text="live kernels").wait_for()
    page.locator("#server-numbers", has_text="python:local").wait_for()  # the warm pool's fill
    # The chart draws kernel memory in blue (#2458c6): some of its pixels are. Counted as
    # blue at 40% coverage or more, not only exactly: a 2-pixel line is anti-aliased, and
    # short or steep segments leave few pixels of the exact colour.
    page.wait_for_function("""() => {
        const c = document.getElementById('memory-chart');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let blue = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] - d[i] > 60 && d[i + 2] - d[i + 1] > 25) blue++;
        return blue > 20;
    }""", timeout=40_000)
    page.screenshot(path=ARTIFACTS / "server.png")
    close(context)


def test_interrupt_restart_duplicate_and_delete_from_the_page(browser, server):
    api(server, "POST", "/api/sessions", {"language": "python", "id": "console-actions"}, expect=201)
    context = keyed_context(browser, server)
    page = open_session(context, "console-actions")
    run_code(page, "import time\nx = 1\ntime.sleep(60)")
    cell = last_cell(page)
    cell.locator(".cell-status", has_text="running").wait_for()
    page.click("#interrupt-button")
    cell.locator(".out-error", has_text="KeyboardInterrupt").wait_for()
    page.click(".session-head button[data-action='restart']")
    run_code(page, "print('x' in dir())")  # queued behind the restart: a fresh kernel
    last_cell(page).locator(".out-stdout", has_text="False").wait_for()
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    page.goto("/#/")
    row = page.locator("tr[data-session-id='console-actions']")
    row.locator("button[data-action='duplicate']").click()
    page.locator("#notice", has_text="Duplicated as").wait_for()
    copy_id = page.locator("#notice").inner_text().rsplit(" ", 1)[1]
    copy = page.locator(f"tr[data-session-id='{copy_id}']")
    copy.wait_for()
    copy.locator("button[data-action='delete']").click()
    copy.wait_for(state="detached")
    assert server.request("GET", f"/api/sessions/{copy_id}", headers={"Authorization": f"Bearer {KEY}"})[0] == 404
    close(context)


def test_setup_log_streams_into_the_files_tab(browser, server):
    api(server, "POST", "/api/sessions", {"language": "python", "id": "console-setup",
                                          "setup": {"commands": ["echo early-setup-line", "sleep 1",
                                                                 "echo late-setup-line", "sleep 2"]}}, expect=201)
    context = keyed_context(browser, server)
    page = open_session(context, "console-setup", tab="files")
    page.locator("#setup-log", has_text="late-setup-line").wait_for()
    assert "completed" not in page.locator("#setup-status").inner_text()  # streamed, not the stored log
    page.locator("#setup-status", has_text="completed").wait_for()
    assert "early-setup-line" in page.locator("#setup-log").inner_text()
    close(context)


def test_a_page_opened_mid_run_sees_the_run_from_its_start(browser, server, session_id):
    # The run waits for a file the test writes once the page is open: the page comes mid-run.
    code = ("import os, time\nprint('before the page', flush=True)\n"
            "while not os.path.exists('page-open'):\n    time.sleep(0.02)\nprint('after the page')")
    accepted = api(server, "POST", f"/api/sessions/{session_id}/run", {"code": code, "background": True}, expect=202)
    events = f"/api/sessions/{session_id}/runs/{accepted['run_id']}/events"
    deadline = time.monotonic() + 20
    while "before the page" not in json.dumps(api(server, "GET", events)["events"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    context = keyed_context(browser, server)
    page = open_session(context, session_id)
    status, _ = server.request("PUT", f"/api/sessions/{session_id}/files/page-open", b"",
                               headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    cell = page.locator(f".cells .cell[data-run-id='{accepted['run_id']}']")
    cell.locator(".cell-status", has_text="done").wait_for()
    assert cell.locator(".out-stdout").inner_text().split() == "before the page after the page".split()
    assert "print('before the page', flush=True)" in cell.locator(".cell-code").inner_text()
    close(context)
