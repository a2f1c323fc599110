"""Open a report in headless Chromium over the DevTools protocol (a stdlib websocket client, no dependency): load
time, console messages and uncaught errors, every request the page made, scripted clicks and screenshots. Used by
the report's browser test, benchmarks/report_size.py and the README screenshot.

    with Browser() as b:                      # chromium (Debian's package) on PATH, or CHROMIUM=/path/to/it
        page = b.open("report.html")          # waits for the load event; page.seconds: navigation to load
        b.evaluate("document.querySelectorAll('.pass-detail').length")
        b.screenshot("shot.png", width=1400, height=1000)
        page.console, page.errors, page.requests
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """$CHROMIUM, else the first of chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class _Socket:
    """Just enough of RFC 6455 for the DevTools protocol: masked text frames out, frames in."""

    def __init__(self, url: str, timeout: float) -> None:
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        if not m:
            raise BrowserError(f"unexpected DevTools URL {url!r}")
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise BrowserError("DevTools closed the connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise BrowserError(f"DevTools refused the websocket: {head[:200]!r}")
        self.buf = bytearray(head.split(b"\r\n\r\n", 1)[1])

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise BrowserError("DevTools closed the connection")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise BrowserError("DevTools closed the websocket")
            if opcode in (0, 1, 2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Page:
    url: str
    seconds: float = 0.0  # from navigation to the load event
    console: list[tuple[str, str]] = field(default_factory=list)  # (level, text) of console calls and log entries
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


class Browser:
    """One headless Chromium with one page, driven over DevTools; a context manager that kills it on exit."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0) -> None:
        self.exe = executable or find_chromium()
        if not self.exe:
            raise BrowserError("no Chromium found: install Debian's `chromium` package (apt-get install -y chromium) "
                               "or set CHROMIUM to a Chrome/Chromium binary")
        self.timeout = timeout
        self._id = 0
        self._seen: set[str] = set()
        self.page: Page | None = None

    def __enter__(self) -> "Browser":
        self._profile = tempfile.TemporaryDirectory(prefix="caramba-chromium-")
        self.proc = subprocess.Popen(
            [self.exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={self._profile.name}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._port()
            self.ws = _Socket(self._page_url(port), self.timeout)
            for domain in ("Runtime", "Log", "Network", "Page"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _port(self) -> int:
        """The port Chromium wrote to DevToolsActivePort in its profile."""
        f = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"{self.exe} exited with status {self.proc.returncode} on start")
            if f.exists():
                text = f.read_text().split()
                if text:
                    return int(text[0])
            time.sleep(0.05)
        raise BrowserError(f"{self.exe} did not open its DevTools port within {self.timeout:.0f} s")

    def _page_url(self, port: int) -> str:
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)
        raise BrowserError("Chromium opened no page")

    def __exit__(self, *exc: Any) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        self._profile.cleanup()

    # -- protocol -----------------------------------------------------------------------------------------------
    def _event(self, msg: dict[str, Any]) -> None:
        page, method, p = self.page, msg.get("method"), msg.get("params", {})
        if method:
            self._seen.add(method)
        if page is None:
            return
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            page.console.append((p.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            page.errors.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            page.console.append((e.get("level", "info"), e.get("text", "")))
        elif method == "Network.requestWillBeSent":
            page.requests.append(p.get("request", {}).get("url", ""))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._event(msg)
        raise BrowserError(f"{method}: no answer within {self.timeout:.0f} s")

    def _wait(self, method: str) -> None:
        deadline = time.monotonic() + self.timeout
        while method not in self._seen and time.monotonic() < deadline:
            self._event(json.loads(self.ws.recv()))
        if method in self._seen:
            return
        raise BrowserError(f"no {method} within {self.timeout:.0f} s")

    # -- what tests use -----------------------------------------------------------------------------------------
    def open(self, path: str | Path) -> Page:
        """Navigate to a file and wait for its load event."""
        url = Path(path).resolve().as_uri()
        self.page = Page(url)
        self._seen.clear()
        start = time.perf_counter()
        self.call("Page.navigate", url=url)
        self._wait("Page.loadEventFired")
        self.page.seconds = time.perf_counter() - start
        return self.page

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JS expression in the page (an exception there is a BrowserError)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression[:80]!r} threw: {r['exceptionDetails'].get('text')} "
                               f"{r.get('result', {}).get('description', '')}")
        return r.get("result", {}).get("value")

    def screenshot(self, path: str | Path, width: int = 1400, height: int = 1000, scale: float = 1.0) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=scale,
                  mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
