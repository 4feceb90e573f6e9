"""Open report pages in headless Chromium and report what a person would notice: console errors,
failed loads, broken images, links to missing files, network requests; take screenshots.

Talks to Chromium's DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and
4, NUL-terminated JSON), so it needs nothing beyond the standard library and a ``chromium``
binary (Debian: ``apt-get install chromium``). Used by the report's browser tests and by hand::

    with Browser() as b:
        page = b.open(Path("report/index.html"), screenshot=Path("/tmp/index.png"))
        print(page.problems())
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-extensions", "--disable-sync", "--mute-audio", "--hide-scrollbars"]
INSTALL_HINT = "install Debian's chromium (apt-get install chromium) to run the browser tests"

_PAGE_PROBE = r"""(() => {
  const abs = (el, attr) => new URL(el.getAttribute(attr), document.baseURI).href;
  const links = [...document.querySelectorAll('a[href]')].map(a => abs(a, 'href'));
  const imgs = [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}));
  const svgImages = [...document.querySelectorAll('image')].map(i => abs(i, 'href'));
  const sheets = [...document.querySelectorAll('link[rel=stylesheet]')].map(l => ({href: l.href, ok: !!l.sheet}));
  return {links, imgs, svgImages, sheets, scripts: document.scripts.length, text: document.body.innerText,
          title: document.title, height: document.documentElement.scrollHeight};
})()"""


def find_chromium() -> str | None:
    """Path of a Chromium binary (``/usr/bin/chromium`` first), or None."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """Chromium could not be started or stopped answering."""


@dataclass
class PageReport:
    """What loading one page showed."""

    url: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    missing_targets: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    scripts: int = 0
    text: str = ""
    title: str = ""
    dialogs: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Every problem found, one line each (empty: the page is fine)."""
        out = [f"console error: {m}" for m in self.console_errors]
        out += [f"failed to load: {u}" for u in self.failed_requests]
        out += [f"broken image: {u}" for u in self.broken_images]
        out += [f"link to a missing file: {u}" for u in self.missing_targets]
        out += [f"network request: {u}" for u in self.requests if not u.startswith(("file:", "data:", "about:"))]
        out += [f"dialog opened: {m}" for m in self.dialogs]
        return out


def _file_of(url: str) -> Path | None:
    parts = urlsplit(url)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


class Browser:
    """One headless Chromium process; :meth:`open` loads a page in a fresh tab."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise BrowserError(INSTALL_HINT)
        self.width, self.height, self.timeout = width, height, timeout
        self._id = 0
        self._events: list[dict] = []

    def __enter__(self) -> Browser:
        self.profile = tempfile.mkdtemp(prefix="atlas-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire():  # in the child: the pipe ends go to fds 3 (commands in) and 4 (replies out)
            import fcntl

            a, b = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)  # dup2 makes them inheritable; every other fd of ours is close-on-exec
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=wire)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self.call("Target.setDiscoverTargets", {"discover": False})
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    # --- protocol -----------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium exited (code {self.proc.poll()})")
                self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one DevTools command and return its result (events seen meanwhile are kept)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _wait_event(self, method: str, session: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self._events:
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return ev
            ev = self._read_message(deadline)
            self._events.append(ev)
            if ev.get("method") == "Page.javascriptDialogOpening":  # a dialog blocks the page: dismiss it
                self._id += 1
                os.write(self._to_child, json.dumps({"id": self._id, "method": "Page.handleJavaScriptDialog",
                                                     "params": {"accept": False}, "sessionId": session}).encode() + b"\0")

    # --- pages --------------------------------------------------------------------------------
    def open(self, page: Path | str, screenshot: Path | None = None, full_page: bool = True,
             evaluate: dict[str, str] | None = None) -> PageReport:
        """Load a page (a file path or URL) in a new tab, collect what went wrong, evaluate the given
        JavaScript expressions (results in ``report.values`` by name), optionally save a PNG
        screenshot, and close the tab."""
        url = Path(page).resolve().as_uri() if not str(page).startswith(("file:", "http:", "https:")) else str(page)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._events = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self._wait_event("Page.loadEventFired", session, self.timeout)
        probe = self.call("Runtime.evaluate", {"expression": _PAGE_PROBE, "returnByValue": True},
                          session=session)["result"]["value"]
        report = PageReport(url, links=probe["links"], scripts=probe["scripts"], text=probe["text"],
                            title=probe["title"])
        for name, expr in (evaluate or {}).items():
            res = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
            if "exceptionDetails" in res:
                raise BrowserError(f"evaluating {name}: {res['exceptionDetails'].get('text')}")
            report.values[name] = res["result"].get("value")
        if screenshot is not None:
            if full_page:
                h = min(int(probe["height"]), 16000)
                self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": h,
                                                                 "deviceScaleFactor": 1, "mobile": False},
                          session=session)
            shot = self.call("Page.captureScreenshot", {"format": "png"}, session=session)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        for ev in self._events:
            if ev.get("sessionId") != session:
                continue
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                report.console_errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                report.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                report.console_errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif m == "Network.loadingFailed":
                report.failed_requests.append(f"{p.get('errorText')} ({p.get('requestId')})")
            elif m == "Network.requestWillBeSent":
                report.requests.append(p["request"]["url"])
            elif m == "Page.javascriptDialogOpening":
                report.dialogs.append(p.get("message", ""))
        report.broken_images = [i["src"] for i in probe["imgs"] if not i["ok"]]
        report.broken_images += [s["href"] for s in probe["sheets"] if not s["ok"]]
        for u in probe["links"] + probe["svgImages"]:
            f = _file_of(u.split("#")[0])
            if f is not None and not f.is_file():
                report.missing_targets.append(u)
        self.call("Target.closeTarget", {"targetId": target})
        return report
