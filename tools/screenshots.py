"""The README's screenshots of `mlflow ui`: docs/img/*.png at 1366 and 1600 px wide (`make screenshots`).

A small quick study (`make sweep` at STEPS steps) and a smoke trial go into a fresh store (or STORE=sqlite:///…
reuses one), a real `mlflow ui` serves it on 127.0.0.1, and headless Chromium (Debian's `chromium`, driven by
Playwright: the `.[screenshots]` extra) draws the saved views, the study's parent run and its forest plot.
docs/mlflow.md says what each image shows."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "img"
WIDTHS = (1366, 1600)
HEIGHT = 900
RENDER_MS = 6000  # MLflow's React app renders after its API calls return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def harness(*arguments: str, store: str, cwd: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "harness", *arguments, f"tracking.uri={store}"], cwd=cwd, env=env, check=True)


def make_store(work: Path, steps: int) -> str:
    store = f"sqlite:///{work / 'mlflow.db'}"
    harness(
        "+sweep=quick",
        f"trainer.max_steps={steps}",
        f"trainer.checkpoint_interval={max(steps // 2, 1)}",
        f"hydra.sweep.dir={work / 'multirun'}",
        f"hydra.sweeper.report_dir={work / 'report'}",
        store=store,
        cwd=work,
    )
    harness(f"trainer.max_steps={2 * steps}", f"hydra.run.dir={work / 'smoke'}", store=store, cwd=work)
    return store


def pages(store: str, address: str) -> dict[str, str]:
    """Image name: the UI address it shows."""
    from mlflow.tracking import MlflowClient

    from harness.tracking.store import UI_MODE, VIEWS, mark_experiment

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("harness/smoke")
    mark_experiment(client, experiment)  # the saved views as this code writes them
    [parent] = client.search_runs([experiment.experiment_id], "tags.study_parent = 'true'", max_results=1)
    runs = f"{address}/#/experiments/{experiment.experiment_id}/runs"
    shown = {f"mlflow-{key.removeprefix('harness-')}": f"{runs}?{UI_MODE}&viewStateShareKey={key}" for key in VIEWS}
    shown["mlflow-study-parent"] = f"{runs}/{parent.info.run_id}?{UI_MODE}"
    shown["mlflow-forest"] = f"{runs}/{parent.info.run_id}/artifacts/forest.png?{UI_MODE}"
    return shown


def screenshot(browser, url: str, path: Path, width: int) -> None:
    """The page RENDER_MS after it loaded (MLflow's React app draws after its API calls return). It clicks where
    the MLflow Assistant side panel's close button is; in the screenshots of docs/img that click did not close it."""
    page = browser.new_page(viewport={"width": width, "height": HEIGHT})
    try:
        page.goto(url, wait_until="load", timeout=120_000)
        page.wait_for_timeout(RENDER_MS)
        if page.get_by_text("MLflow Assistant", exact=True).count():
            page.mouse.click(width - 36, 35)  # the panel's close button, at its top right
            page.wait_for_timeout(2000)
        page.screenshot(path=str(path))
    finally:
        page.close()


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: chromium not found; apt-get install -y --no-install-recommends chromium", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="screenshots-"))
    store = os.environ.get("STORE") or make_store(work, int(os.environ.get("STEPS", "10")))
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{address}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        IMAGES.mkdir(parents=True, exist_ok=True)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync"],
            )
            print("drawing", flush=True)
            for name, url in pages(store, address).items():
                for width in WIDTHS:
                    path = IMAGES / f"{name}-{width}.png"
                    screenshot(browser, url, path, width)
                    print(f"{path.relative_to(ROOT)}  {url}", flush=True)
            browser.close()
        shutil.copyfile(IMAGES / "mlflow-study-parent-1366.png", IMAGES / "mlflow-ui.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
