"""``maelab report``: the HTML page of a run, its numbers, embedded figures, evaluations, a run still
running, and the page rendered in a real headless browser (chromium over the DevTools protocol)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import error_line
from tests.engine.test_pretrain import tiny_cfg

from maelab.cli import main
from maelab.config import build_config, save_yaml
from maelab.engine.pretrain import pretrain
from maelab.eval.common import write_eval_json
from maelab.eval.config import KnnConfig
from maelab.viz.report import Series, build_report, find_evals, line_chart

PNG = b"\x89PNG\r\n\x1a\n"
EPOCHS = 2


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A short real pre-training run (2 epochs of 2 steps, a grid and kNN every epoch) and two evaluations
    of it: a sibling folder and a subfolder; a third evaluation names another run."""
    root = tmp_path_factory.mktemp("runs")
    run = root / "mae"
    pretrain(
        tiny_cfg(
            run,
            epochs=EPOCHS,
            vis_every=1,
            log_every=1,
            knn_every=1,
            knn_k=5,
            **{"data.num_samples": 32, "data.num_classes": 4},
        ),
        progress=False,
    )
    _eval(root / "knn_mae", run, 87.125)
    _eval(run / "evals" / "knn_epoch1", run / "checkpoints" / "epoch_0001.pt", 55.375)
    other = root / "other"
    other.mkdir()
    _eval(root / "knn_other", other, 11.625)
    return run


def _eval(out: Path, checkpoint: Path, top1: float) -> None:
    """eval.json as the kNN command writes it (the real writer)."""
    cfg = build_config(KnnConfig, None, {"checkpoint": str(checkpoint), "output": str(out)})
    write_eval_json(out, "knn", {"top1": top1, "top5": 99.5, "k": 20, "loss": 1.23456789e-05}, cfg)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_of_a_real_run_shows_numbers_figures_evals_and_environment(real_run, capsys):
    assert main(["report", str(real_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (real_run / "report.html").read_text()
    last = _records(real_run / "metrics.jsonl")[-1]
    assert f"{last['loss']:.4f}" in page  # last epoch loss
    assert f"finished: {EPOCHS} of {EPOCHS} epochs" in page
    knn = [r["knn_top1"] for r in _records(real_run / "metrics.jsonl")]
    assert f"{knn[-1]:.2f}% / {max(knn):.2f}%" in page
    # every reconstruction grid embedded, in epoch order, byte for byte
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="reconstructions after epoch (\d+)"', page)
    assert [int(e) for _, e in uris] == list(range(1, EPOCHS + 1))
    for data, epoch in uris:
        png = real_run / "figures" / f"reconstruction_epoch{int(epoch):04d}.png"
        assert base64.b64decode(data) == png.read_bytes()
    assert page.count('<svg class="chart"') == 4  # loss, lr, throughput, kNN
    # the environment recorded by pre-training
    env = json.loads((real_run / "env.json").read_text())
    import torch

    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert f"<td>{torch.__version__}</td>" in page
    # evaluations of this run (sibling folder, subfolder), not of another run
    assert "87.12" in page and "55.38" in page and "11.62" not in page
    assert "checkpoints/epoch_0001.pt" in page and "k=20, loss=1.235e-05" in page
    # self-contained: nothing to fetch
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)="(?!data:|#)', page)


def test_find_evals_keeps_those_naming_the_run(real_run):
    found = [p.parent.relative_to(real_run.parent) for p, _ in find_evals(real_run)]
    assert sorted(map(str, found)) == ["knn_mae", "mae/evals/knn_epoch1"]


def test_a_run_still_running_with_a_partial_line(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    save_yaml(tiny_cfg(run, epochs=4), run / "config.yaml")
    first = {"epoch": 1, "step": 4, "loss": 0.8125, "lr": 1e-3, "img_per_s": 50.0}
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n" + '{"epoch": 2, "step": 8, "loss": 0.7')
    (run / "steps.jsonl").write_text('{"step": 2, "loss": 0.9, "lr": 5e-4, "img_per_s": 40.0}\n{"step": 4, "lo')
    page = build_report(run)
    assert "in progress: epoch 1 of 4 done, step 4" in page and '<div class="status running">' in page
    assert "0.8125" in page and "0.7</td>" not in page


def test_a_run_before_its_first_epoch(tmp_path):
    run = tmp_path / "new"
    run.mkdir()
    save_yaml(tiny_cfg(run, epochs=4), run / "config.yaml")
    page = build_report(run)
    assert "in progress: no epoch finished yet" in page
    assert "no reconstruction grid yet" in page and "env.json is missing" in page
    assert page.count("no data yet") == 3


def test_text_is_escaped(tmp_path):
    run = tmp_path / "esc"
    run.mkdir()
    save_yaml(tiny_cfg(run, **{"data.name": "<script>alert(1)</script>"}), run / "config.yaml")
    page = build_report(run)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_line_chart_has_axes_ticks_and_log_scale():
    svg = line_chart([Series("loss", [0, 50, 100], [100.0, 3.0, 0.5])], "training loss", "step", "loss")
    assert svg.startswith('<svg class="chart"') and svg.endswith("</svg>")
    for label in (">step<", ">loss<", ">training loss<", ">0<", ">100<", ">log scale<"):
        assert label in svg
    assert ">1<" in svg and ">10<" in svg  # decade ticks of the log axis
    linear = line_chart([Series("lr", [0, 1, 2], [1.0, 2.0, 3.0])], "lr", "step", "lr")
    assert "log scale" not in linear and ">2<" in linear


def test_report_errors_are_one_line(tmp_path, capsys):
    assert "not a directory" in error_line(capsys, ["report", str(tmp_path / "nowhere")])
    assert "not a pre-training run directory" in error_line(capsys, ["report", str(tmp_path)])


# ---------------------------------------------------------------------------------- real browser
@pytest.fixture(scope="module")
def chromium() -> str:
    """The chromium binary (module scope and first argument: the skip comes before the pre-training run)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip(
        "no chromium browser on this machine (.ci/run installs Debian's with apt-get install -y chromium); "
        "the HTML report was not checked in a browser"
    )


class DevTools:
    """Headless chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the
    browser reads JSON commands from fd 3 and writes replies and events to fd 4, each ended by a NUL)."""

    def __init__(self, binary: str, workdir: Path, timeout: float = 60.0) -> None:
        cmd_read, self._cmd = os.pipe()
        self._replies, reply_write = os.pipe()

        def as_fd_3_and_4() -> None:  # in the child: move the pipe ends to fds 3 and 4
            a = fcntl.fcntl(cmd_read, fcntl.F_DUPFD_CLOEXEC, 10)
            b = fcntl.fcntl(reply_write, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.stderr = workdir / "chromium.log"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={workdir / 'profile'}",
                    "--window-size=1280,2000",
                    "--remote-debugging-pipe",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=as_fd_3_and_4,
                close_fds=False,
            )
        os.close(cmd_read)
        os.close(reply_write)
        self.timeout = timeout  # seconds to wait for any one message
        self.events: list[dict] = []
        self._buf = b""
        self._id = 0

    def _next(self) -> dict:
        while b"\0" not in self._buf:
            if not select.select([self._replies], [], [], self.timeout)[0]:
                raise TimeoutError(f"chromium did not answer; its log: {self.stderr.read_text()[-2000:]}")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe; its log: {self.stderr.read_text()[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._next())
        return next(e for e in self.events if e.get("method") == method)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd)
        os.close(self._replies)


def _render(chromium: str, page: Path, workdir: Path) -> dict:
    """Open ``page`` in headless chromium: the page's ready marker, its text, the errors and the network
    requests it made, and a full-page screenshot in ``workdir/report.png``."""
    browser = DevTools(chromium, workdir)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=s)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False},
            session=s,
        )
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        browser.wait_for("Page.loadEventFired")

        def evaluate(expr: str):
            return browser.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=s)[
                "result"
            ].get("value")

        ready, until = None, time.monotonic() + 20
        while ready is None and time.monotonic() < until:  # set by the page's load handler
            ready = evaluate("document.documentElement.getAttribute('data-report-ready')")
            time.sleep(0.05)
        height = evaluate("document.documentElement.scrollHeight")
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": min(int(height), 12000), "deviceScaleFactor": 1, "mobile": False},
            session=s,
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
        (workdir / "report.png").write_bytes(base64.b64decode(shot))
        text = evaluate("document.body.innerText")
    finally:
        browser.close()
    ev = browser.events
    errors = (
        [e["params"]["exceptionDetails"] for e in ev if e.get("method") == "Runtime.exceptionThrown"]
        + [
            e["params"]
            for e in ev
            if e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
        ]
        + [
            e["params"]["entry"]
            for e in ev
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
        ]
    )
    requests = [e["params"]["request"]["url"] for e in ev if e.get("method") == "Network.requestWillBeSent"]
    return {"ready": ready, "text": text, "errors": errors, "requests": requests}


def test_report_renders_in_a_headless_browser(chromium, real_run, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(real_run), "--output", str(out)]) == 0
    seen = _render(chromium, out, tmp_path)
    assert seen["errors"] == []
    assert [u for u in seen["requests"] if not u.startswith(("file:", "data:"))] == []
    assert seen["ready"] == f"{EPOCHS}/{EPOCHS} images, 4 charts"  # every grid decoded, every chart there
    last = _records(real_run / "metrics.jsonl")[-1]
    for text in (f"{last['loss']:.4f}", "87.12", f"epoch {EPOCHS}", "Training curves", "Environment"):
        assert text in seen["text"]
    shot = (tmp_path / "report.png").read_bytes()
    assert shot[:8] == PNG and len(shot) > 50_000
