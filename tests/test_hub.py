"""`sdxl-trainer push` against a local stand-in for the Hub API (create repo, validate-yaml, preupload, commit)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

TOKEN = "hf_sdxlTrainerTestToken0123456789"
REPO_ID = "tester/tiny-sdxl"


class FakeHub:
    """Records what arrives; `fail_commits` commits answer HTTP 500."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.commits: list[dict[str, bytes]] = []
        self.fail_commits = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return None

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    request = json.loads(body)
                    return self._reply(200, {"url": f"{hub.endpoint}/{request['organization']}/{request['name']}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                if path == f"/api/models/{REPO_ID}/preupload/main":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if path == f"/api/models/{REPO_ID}/commit/main":
                    if hub.fail_commits:
                        hub.fail_commits -= 1
                        return self._reply(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    files = {item["value"]["path"]: base64.b64decode(item["value"]["content"]) for item in lines if item["key"] == "file"}
                    hub.commits.append(files)
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{REPO_ID}/commit/{'a' * 40}", "commitOid": "a" * 40})
                return self._reply(404, {"error": f"no such endpoint {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def run_dir(tmp_path, tiny_pipeline_dir) -> Path:
    """A finished run as the trainer leaves it (final/, README.md, samples/, checkpoints/, logs/)."""
    from sdxl_trainer.utils.model_card import render_model_card

    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline_dir, run / "final")
    (run / "samples").mkdir()
    Image.new("RGB", (8, 8), "red").save(run / "samples" / "step-000002.png")
    summary = {"steps": 2, "images": 24, "prediction_type": "v_prediction", "last_sample": "samples/step-000002.png"}
    (run / "README.md").write_text(render_model_card(summary, run_name="run", pretrained="builtin:tiny-base"))
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text("train: {max_steps: 2}\n")
    (run / "logs").mkdir()
    (run / "logs" / "events.out.tfevents.1").write_bytes(b"events")
    step = run / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / "unet.safetensors").write_bytes(b"weights")
    (step / "manifest.json").write_text(json.dumps({"format": 1, "step": 2, "files": {"unet.safetensors": 7}}))
    (run / "checkpoints" / "latest").write_text(json.dumps({"name": "step-000002", "step": 2}))
    return run


def _push(run: Path, hub: FakeHub | None, home: Path, *extra: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "sdxl_trainer", "push", str(run), "--repo-id", REPO_ID, *extra],
                          capture_output=True, text=True, timeout=120, env=env)


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_uploads_pipeline_card_and_samples(run_dir, fake_hub, tmp_path):
    result = _push(run_dir, fake_hub, tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert TOKEN not in result.stdout + result.stderr
    [files] = fake_hub.commits
    expected = {p.relative_to(run_dir / "final").as_posix() for p in (run_dir / "final").rglob("*") if p.is_file()}
    assert set(files) == expected | {"README.md", "samples/step-000002.png"}  # no logs, checkpoints or config
    assert files["unet/diffusion_pytorch_model.safetensors"] == (run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert f'from_pretrained("{REPO_ID}"' in card  # the usage snippet points at the repo
    assert 'from_pretrained("final"' in (run_dir / "README.md").read_text()  # the local card is unchanged
    for _, path, headers, body in fake_hub.requests:
        assert headers.get("authorization") == f"Bearer {TOKEN}", path
        assert TOKEN.encode() not in body, path
    create = next(json.loads(body) for _, path, _, body in fake_hub.requests if path == "/api/repos/create")
    assert create["name"] == "tiny-sdxl" and create["organization"] == "tester"


def test_push_with_state_includes_checkpoint_and_logs(run_dir, fake_hub, tmp_path):
    result = _push(run_dir, fake_hub, tmp_path / "home", "--include-state", "--private")
    assert result.returncode == 0, result.stderr[-3000:]
    [files] = fake_hub.commits
    assert {"checkpoints/step-000002/unet.safetensors", "logs/events.out.tfevents.1", "config.yaml", "summary.json"} <= set(files)
    create = next(json.loads(body) for _, path, _, body in fake_hub.requests if path == "/api/repos/create")
    assert create["visibility"] == "private"


def test_failed_upload_leaves_the_run_intact_and_a_retry_works(run_dir, fake_hub, tmp_path):
    before = _fingerprint(run_dir)
    fake_hub.fail_commits = 1
    failed = _push(run_dir, fake_hub, tmp_path / "home")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "HTTP 500" in failed.stderr and "retry later" in failed.stderr
    assert TOKEN not in failed.stdout + failed.stderr
    assert _fingerprint(run_dir) == before
    assert not fake_hub.commits

    retried = _push(run_dir, fake_hub, tmp_path / "home")
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert len(fake_hub.commits) == 1 and "README.md" in fake_hub.commits[0]
    assert _fingerprint(run_dir) == before


def test_push_without_token_is_bad_input(run_dir, fake_hub, tmp_path):
    result = _push(run_dir, fake_hub, tmp_path / "empty-home", token=None)
    assert result.returncode == 2
    assert "no Hugging Face token" in result.stderr and "HF_TOKEN" in result.stderr
    assert not fake_hub.requests


def test_push_of_a_run_without_final_is_bad_input(tmp_path, fake_hub):
    (tmp_path / "unfinished").mkdir()
    result = _push(tmp_path / "unfinished", fake_hub, tmp_path / "home")
    assert result.returncode == 2
    assert "has no final/ pipeline" in result.stderr
