"""Where a researcher watches a search from, besides rayq's own table (rayq.search.progress):

- Ray's dashboard (`rayq search --dashboard`): started on loopback with the embedded local Ray;
  it needs Ray's `default` extra (`pip install 'ray[default]'`), checked before Ray starts.
- optuna-dashboard: the Optuna study lives in `DIR/optuna.db` (SQLite), so
  `optuna-dashboard sqlite:///DIR/optuna.db` shows the sampler's trials while the search runs.
- TensorBoard: Tune's TBXLoggerCallback writes event files in every trial directory under the
  Tune experiment directory, so `tensorboard --logdir <storage>/tune` shows every trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from rayq.errors import UserError

__all__ = ["OPTUNA_DB", "OPTUNA_STUDY", "optuna_storage_url", "optuna_storage", "check_dashboard",
           "tensorboard_line", "optuna_line"]

OPTUNA_DB = "optuna.db"
OPTUNA_STUDY = "rayq"


def optuna_storage_url(out_dir: str | Path) -> str:
    """The SQLAlchemy URL of the search's Optuna study (an absolute path: four slashes)."""
    return f"sqlite:///{(Path(out_dir).resolve() / OPTUNA_DB).as_posix()}"


def optuna_storage(out_dir: str | Path) -> Any:
    """An `optuna.storages.RDBStorage` on `optuna_storage_url(out_dir)`, for
    `OptunaSearch(storage=..., study_name=OPTUNA_STUDY)` (Ray 2.60 wants a BaseStorage, not a
    URL; RDBStorage pickles by URL, so Tune's searcher checkpoints and restores carry it)."""
    import optuna

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(optuna_storage_url(out_dir))


def check_dashboard() -> None:
    """UserError before Ray starts when Ray's dashboard cannot run here."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - the import Ray itself checks
    except ImportError as exc:
        raise UserError(f"--dashboard: Ray's dashboard needs Ray's 'default' extra ({exc}); "
                        "install it with: pip install 'ray[default]==2.60.0'") from None


def tensorboard_line(tune_dir: str) -> str:
    return f"TensorBoard: tensorboard --logdir {tune_dir}  (Tune's event files, one folder per trial)"


def optuna_line(out_dir: str | Path) -> Optional[str]:
    db = Path(out_dir).resolve() / OPTUNA_DB
    return f"optuna-dashboard: optuna-dashboard {optuna_storage_url(out_dir)}" if db.exists() else None
