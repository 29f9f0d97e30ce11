"""What an offline W&B run file holds, for tests: run metadata, config, history, summary, artifacts.

Test code: frzoo itself only needs to know whether a run file is complete
(frzoo.logging.wandb.run_file_complete); the records are read with the same parser.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from frzoo.logging.wandb import run_file_records


@dataclass
class OfflineRun:
    path: Path
    run: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    history: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    artifacts: List[Dict[str, Any]] = field(default_factory=list)
    exit_code: Optional[int] = None

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"

    def metric_names(self) -> List[str]:
        return sorted({k for row in self.history for k in row if not k.startswith("_")})


def find_offline_runs(out_dir: Path) -> List[Path]:
    """The `.wandb` files of the W&B runs under a run folder, oldest first."""
    return sorted(Path(out_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.parent.name)


def _set_item(target: Dict[str, Any], item: Any) -> None:
    value = json.loads(item.value_json)
    keys = [item.key] if item.key else list(item.nested_key)
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def read_offline_run(path: Path) -> OfflineRun:
    """Parse a `.wandb` file, or the newest one under a run folder."""
    path = Path(path)
    if path.is_dir():
        found = find_offline_runs(path)
        assert found, f"no W&B run file under {path}"
        path = found[-1]
    out = OfflineRun(path=path)
    for record in run_file_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.run = {"id": run.run_id, "project": run.project, "entity": run.entity,
                       "group": run.run_group, "name": run.display_name, "tags": list(run.tags)}
            for item in run.config.update:
                _set_item(out.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set_item(out.config, item)
        elif kind == "history":
            row: Dict[str, Any] = {}
            for item in record.history.item:
                _set_item(row, item)
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set_item(out.summary, item)
        elif kind == "artifact":
            art = record.artifact
            out.artifacts.append({"type": art.type, "name": art.name,
                                  "files": [entry.path for entry in art.manifest.contents]})
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    out.config.pop("_wandb", None)
    return out
