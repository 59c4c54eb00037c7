"""optuna-dashboard as a WSGI application for gunicorn (`dashboard:application`).

The storage URL comes from OPTUNA_DASHBOARD_STORAGE (no password in it: libpq reads PGPASSFILE). The
dashboard's database role may only read, so Optuna is told not to make tables, and the storage is opened
at the first request that finds Optuna's tables: until someone has made a study in the database, every
request gets 503 with a line saying so (Optuna cannot open a storage without its tables).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import SQLAlchemyError

_lock = threading.Lock()
_app: Callable[..., Iterable[bytes]] | None = None


def _open() -> Callable[..., Iterable[bytes]]:
    from optuna.storages import RDBStorage
    from optuna_dashboard import wsgi

    storage = RDBStorage(
        os.environ["OPTUNA_DASHBOARD_STORAGE"],
        engine_kwargs={"pool_pre_ping": True},
        skip_table_creation=True,
    )
    return wsgi(storage)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _app
    with _lock:
        if _app is None:
            try:
                _app = _open()
            except (SQLAlchemyError, StorageInternalError) as e:  # Optuna wraps SQLAlchemy's
                start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
                return [f"no Optuna studies in this database yet ({type(e).__name__})\n".encode()]
    return _app(environ, start_response)
