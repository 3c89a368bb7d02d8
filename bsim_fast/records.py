"""A run's records beside its metrics: `run.json` (the code, packages, device and world size of every start) and
the optional W&B run that syncs the TensorBoard logs (`train.wandb=PROJECT`).

`run.json` is `{"starts": [...], "wandb": {"project", "id"}}`: one entry per start of the run (a new run, then
each resume: its step, `--resume` and `provenance.environment`), appended and rewritten atomically by rank 0,
so a run resumed on another machine or commit keeps the record of each. `--resume none` moves it aside with the
earlier run's files (resume.RUN_FILES). The W&B id kept there makes a resumed run continue the same W&B run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .config import Config, ConfigError, to_dict

RUN_RECORD = "run.json"
WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name


def check_wandb(cfg: Config) -> None:
    """train.wandb, before any work: a project name W&B accepts, TensorBoard on (what it syncs), the package
    installed (found, not imported: importing wandb takes seconds). One line naming the file or override."""
    project = cfg.train.wandb
    if not project:
        return
    where = f"{cfg.where('train.wandb')}: train.wandb = {project!r}"
    if bad := [c for c in WANDB_FORBIDDEN if c in project]:
        raise ConfigError(f"{where}: a W&B project name cannot hold {' '.join(bad)}")
    if not cfg.train.tensorboard:
        raise ConfigError(f"{where} syncs the TensorBoard logs, which train.tensorboard=false turns off")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"{where}: the wandb package is not installed (pip install 'bsim_fast[wandb]'), or turn it off with "
            f"train.wandb="
        )


def read_record(out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """The run's record, or a new one. A file that is not a record (edited by hand, or another program's) is
    moved aside to run.json.unreadable-N, said in one line, and a new record starts: a log never stops a run."""
    path = Path(out_dir) / RUN_RECORD
    if not path.exists():
        return {"starts": []}
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("starts"), list):
            return record
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    n = 1
    while path.with_name(f"{RUN_RECORD}.unreadable-{n}").exists():
        n += 1
    aside = path.with_name(f"{RUN_RECORD}.unreadable-{n}")
    os.replace(path, aside)  # a rename in one folder: nothing to make atomic
    log(f"[run] {path} is not a run record: moved to {aside.name}; a new record starts")
    return {"starts": []}


def start_wandb(cfg: Config, out_dir: Path, record: dict) -> Any:
    """The W&B run that syncs out_dir/tb (it must start before the SummaryWriter, whose writes it hooks):
    the id in `record` when its project is the same (a resumed run continues it), a new one stored there
    otherwise. WANDB_MODE=offline keeps it in out_dir/wandb/ for `wandb sync`."""
    import wandb

    project = cfg.train.wandb
    known = record.get("wandb") or {}
    run_id = known["id"] if known.get("project") == project and known.get("id") else secrets.token_hex(6)
    # the writer's folder as the root (without one W&B waits 10 s, then takes the current folder, and cannot
    # place an out_dir outside it); save=False: the events reach W&B as history and media, not again as files
    wandb.tensorboard.unpatch()  # a hook an earlier run in this process left (none when it finished)
    wandb.tensorboard.patch(root_logdir=str(Path(out_dir) / "tb"), save=False)
    try:
        wb = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            name=Path(out_dir).name,
            dir=str(out_dir),
            config=to_dict(cfg),
            sync_tensorboard=True,
        )
    except wandb.errors.Error as e:  # no login, no network: one line instead of W&B's traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        wandb.tensorboard.unpatch()
        raise ConfigError(
            f"{cfg.where('train.wandb')}: train.wandb = {project!r}: W&B did not start ({first}); run `wandb login`, "
            f"set WANDB_MODE=offline, or turn it off with train.wandb="
        ) from None
    record["wandb"] = {"project": project, "id": run_id}
    return wb


def finish_wandb(wb: Any, exit_code: int = 0) -> None:
    """Ends the W&B run (after the TensorBoard writer's last events), waits until W&B has written all of it
    (`finish` returns while its service still writes; `teardown` stops the service, which a later run starts
    again), and takes W&B's hook off TensorBoard's writer, which it leaves in place."""
    import wandb

    wb.finish(exit_code=exit_code)
    wandb.teardown()
    wandb.tensorboard.unpatch()


def record_start(out_dir: Path, record: dict, entry: dict) -> None:
    """Appends this start to the record and writes run.json atomically."""
    record["starts"].append(entry)
    write_text_atomic(Path(out_dir) / RUN_RECORD, json.dumps(record, indent=1))


__all__ = ["RUN_RECORD", "check_wandb", "finish_wandb", "read_record", "record_start", "start_wandb"]
