"""MLflow's permission layer (its ``basic-auth`` app) with the login the lab's web portal passes.

The portal checks the member's LDAP password and puts the login in a header (LABKIT_MLFLOW_USER_HEADER,
X-WEBAUTH-USER by default; it drops any copy a client sends), and MLflow listens on loopback only, behind
it. So MLflow does not check a password: this ``authorization_function`` takes the login from the header
and makes the member in MLflow's user store at first sight, with a random password nobody knows (MLflow
insists on one). MLflow's own rules then apply: who creates an experiment MANAGEs it, everyone else gets
the default permission (READ in labkit): bob reads alice's experiment, but cannot change or delete it.
Logins in LABKIT_MLFLOW_ADMINS (comma-separated) are MLflow admins. MLflow's own admin account (its
password from the vault) can never be used through the header.
"""

from __future__ import annotations

import os
import re
import secrets

from flask import Response, request
from mlflow.exceptions import MlflowException
from mlflow.server.auth import auth_config, store
from werkzeug.datastructures import Authorization

LOGIN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def _admins() -> set[str]:
    return {name.strip() for name in os.environ.get("LABKIT_MLFLOW_ADMINS", "").split(",") if name.strip()}


def _ensure_user(login: str) -> None:
    admin = login in _admins()
    if not store.has_user(login):
        try:
            store.create_user(login, secrets.token_urlsafe(32), is_admin=admin)
        except MlflowException:
            if not store.has_user(login):  # not another worker making the same member at once
                raise
        return
    if store.get_user(login).is_admin != admin:
        store.update_user(login, is_admin=admin)


def authenticate_request_portal_header() -> Authorization | Response:
    header = os.environ.get("LABKIT_MLFLOW_USER_HEADER", "X-WEBAUTH-USER")
    login = request.headers.get(header, "")
    if not LOGIN.match(login) or login == auth_config.admin_username:
        return Response("no lab login: use MLflow through the lab's web portal\n", status=401,
                        mimetype="text/plain")
    _ensure_user(login)
    return Authorization("basic", {"username": login})
