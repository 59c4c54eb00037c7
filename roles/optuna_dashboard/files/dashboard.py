"""optuna-dashboard as a WSGI application for gunicorn (`dashboard:application`).

The storage URL comes from OPTUNA_DASHBOARD_STORAGE (no password in it: libpq reads PGPASSFILE). With
``{login}`` in it, every member sees their own database: the login is the one the web portal puts in the
header named by OPTUNA_DASHBOARD_USER_HEADER (the portal drops any copy a client sends, and this server
listens on loopback only). A request without that header, or with a login that is not a plain account
name, gets 403. Without ``{login}`` every request reads the one database. ``/-/healthy`` answers 200
without a login (the blackbox probe: the server is up).

The dashboard's database role may only read, so Optuna is told not to make tables, and a member's storage
is opened at their first request that finds Optuna's tables: until they made a study, their requests get
503 with a line saying so (Optuna cannot open a storage without its tables). Connections are not pooled
(NullPool): the dashboard's requests are few, and many members' idle pools would hold the service
account's connection limit.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import SQLAlchemyError

App = Callable[..., Iterable[bytes]]
HEALTH_PATH = "/-/healthy"
LOGIN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
KEEP = 64  # members' dashboards kept open at once (least recently used closed first)

_lock = threading.Lock()
_apps: OrderedDict[str, App] = OrderedDict()


def _open(url: str) -> App:
    from optuna.storages import RDBStorage
    from optuna_dashboard import wsgi
    from sqlalchemy.pool import NullPool

    storage = RDBStorage(url, engine_kwargs={"poolclass": NullPool}, skip_table_creation=True)
    return wsgi(storage)


def _answer(start_response: Callable[..., Any], status: str, line: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [(line + "\n").encode()]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == HEALTH_PATH:  # for the blackbox probe: the server answers, no login
        return _answer(start_response, "200 OK", "ok")
    template = os.environ["OPTUNA_DASHBOARD_STORAGE"]
    login = ""
    if "{login}" in template:
        header = os.environ.get("OPTUNA_DASHBOARD_USER_HEADER", "X-WEBAUTH-USER")
        login = str(environ.get("HTTP_" + header.upper().replace("-", "_"), ""))
        if not LOGIN.match(login):
            return _answer(start_response, "403 Forbidden",
                           "no lab login: open the dashboard through the web portal")
    with _lock:
        app = _apps.get(login)
        if app is None:
            try:
                app = _open(template.replace("{login}", login))
            except (SQLAlchemyError, StorageInternalError) as e:  # Optuna wraps SQLAlchemy's
                return _answer(start_response, "503 Service Unavailable",
                               f"no Optuna studies in {'your' if login else 'this'} database yet "
                               f"({type(e).__name__})")
            _apps[login] = app
            while len(_apps) > KEEP:
                _apps.popitem(last=False)
        _apps.move_to_end(login)
    return app(environ, start_response)
