"""Upload a run to the Hugging Face Hub: the pipeline of final/ at the repo root, README.md, samples/.

The token comes from HF_TOKEN or the standard login (`hf auth login`); it is only handed to
huggingface_hub, never printed, logged or written. Nothing in the run folder is modified, so a
failed upload can simply be retried. Logs and checkpoints go up only with `include_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdxl_trainer.utils.logging import get_logger
from sdxl_trainer.utils.model_card import USAGE_MODEL_PATH

log = get_logger("hub")

USAGE_PATH_IN_CARD = f'from_pretrained("{USAGE_MODEL_PATH}"'


class HubInputError(ValueError):
    """The upload cannot start: no token, offline mode, a bad repo id or run folder (exit 2)."""


class HubServerError(RuntimeError):
    """The Hub (or the network to it) failed; the run folder is untouched, retry later (exit 1)."""


@dataclass(frozen=True)
class PlannedFile:
    local: Path
    path_in_repo: str


def plan_upload(run_dir: Path, *, include_state: bool = False) -> list[PlannedFile]:
    """Which files go where: final/* -> repo root, README.md, samples/*; with include_state also the
    latest checkpoint, logs/, config.yaml, summary.json and train.log."""
    from sdxl_trainer.utils.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "model_index.json").is_file():
        raise HubInputError(f"{run_dir} has no final/ pipeline (final/model_index.json); finish the run, "
                            f"or export one with `sdxl-trainer export {run_dir} --format diffusers --out {final}`")
    planned = [PlannedFile(p, p.relative_to(final).as_posix()) for p in sorted(final.rglob("*")) if p.is_file()]
    if (run_dir / "README.md").is_file():
        planned.append(PlannedFile(run_dir / "README.md", "README.md"))
    planned += [PlannedFile(p, p.relative_to(run_dir).as_posix()) for p in sorted((run_dir / "samples").glob("*.png"))]
    if include_state:
        for name in ("config.yaml", "summary.json", "train.log"):
            if (run_dir / name).is_file():
                planned.append(PlannedFile(run_dir / name, name))
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        folders = [run_dir / "logs"] + ([checkpoint] if checkpoint is not None else [])
        for folder in folders:
            planned += [PlannedFile(p, p.relative_to(run_dir).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()]
    return planned


def _card_for_repo(readme: Path, repo_id: str) -> bytes:
    """The local card with its usage snippet pointing at the repo instead of the local final/."""
    text = readme.read_text(encoding="utf-8")
    return text.replace(USAGE_PATH_IN_CARD, f'from_pretrained("{repo_id}"').encode("utf-8")


def push_run(run_dir: Path, repo_id: str, *, private: bool = False, include_state: bool = False) -> str:
    """Create the repo (if needed) and upload the run in one commit; returns the commit URL."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors mean "could not reach the Hub"
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise HubInputError(f"--repo-id {repo_id!r} is not a valid repo id (owner/name): {err}") from None
    if "/" not in repo_id:
        raise HubInputError(f"--repo-id {repo_id!r}: give owner/name (your user or organisation name, a slash, the model name)")
    planned = plan_upload(run_dir, include_state=include_state)
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubInputError("HF_HUB_OFFLINE is set: uploads are disabled; unset it to push")
    token = huggingface_hub.get_token()
    if not token:
        raise HubInputError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`, then retry")
    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=f.path_in_repo,
                           path_or_fileobj=_card_for_repo(f.local, repo_id) if f.path_in_repo == "README.md" else str(f.local))
        for f in planned
    ]
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=operations, commit_message=f"Upload {Path(run_dir).name} (sdxl-trainer)")
    except OfflineModeIsEnabled as err:
        raise HubInputError(f"offline mode is enabled, nothing was uploaded: {err}") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubInputError(f"the Hub rejected the token for {repo_id} (HTTP {status}): check that it has write access, then retry") from None
        if status is not None and 400 <= status < 500:
            raise HubInputError(f"the Hub refused the upload to {repo_id} (HTTP {status}): {err}") from None
        raise HubServerError(f"the Hub failed while uploading to {repo_id} (HTTP {status}); nothing in {run_dir} changed, retry later: {err}") from None
    except (httpx2.TransportError, OSError) as err:
        raise HubServerError(f"could not reach the Hub to upload {repo_id} ({type(err).__name__}: {err}); nothing in {run_dir} changed, retry later") from None
    log.info("uploaded %d files to %s", len(operations), repo_id)
    return info.commit_url
