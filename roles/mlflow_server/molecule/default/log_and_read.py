"""Log a run with a metric, a parameter and two artifacts (one of 32 MiB) to the MLflow server, then
read all of it back through the REST API and the artifact proxy; prints one JSON line of what it read.

As the member named by the second argument: every request carries the login in X-WEBAUTH-USER, as the
web portal sends it (MLflow's client through a request-header provider of this script)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider
from mlflow.tracking.request_header.registry import _request_header_provider_registry

URL, USER = sys.argv[1], sys.argv[2]
HEADERS = {"X-WEBAUTH-USER": USER}


class PortalLogin(RequestHeaderProvider):
    def in_context(self) -> bool:
        return True

    def request_headers(self) -> dict[str, str]:
        return dict(HEADERS)


def get(path: str) -> bytes:
    if not URL.startswith("http://"):
        raise SystemExit(f"not an http:// URL: {URL}")
    with urllib.request.urlopen(urllib.request.Request(URL + path, headers=HEADERS), timeout=120) as response:  # noqa: S310 (http only, checked)
        body: bytes = response.read()
    return body


def main() -> int:
    _request_header_provider_registry.register(PortalLogin)
    mlflow.set_tracking_uri(URL)
    mlflow.set_experiment("molecule-check")
    big = os.urandom(32 * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        notes, weights = Path(tmp) / "notes.txt", Path(tmp) / "weights.bin"
        notes.write_text("lr=0.003 was best\n")
        weights.write_bytes(big)
        with mlflow.start_run() as run:
            mlflow.log_param("lr", 0.003)
            for step, loss in enumerate([0.9, 0.5, 0.25]):
                mlflow.log_metric("loss", loss, step=step)
            mlflow.log_artifact(str(notes))
            mlflow.log_artifact(str(weights), artifact_path="model")
    run_id = run.info.run_id
    got = json.loads(get(f"/api/2.0/mlflow/runs/get?run_id={run_id}"))["run"]
    history = json.loads(get(f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss"))
    experiment_id = got["info"]["experiment_id"]
    notes_back = get(f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/notes.txt")
    with tempfile.TemporaryDirectory() as tmp:
        local = MlflowClient().download_artifacts(run_id, "model/weights.bin", tmp)
        weights_ok = hashlib.sha256(Path(local).read_bytes()).digest() == hashlib.sha256(big).digest()
    print(
        json.dumps(
            {
                "run_id": run_id,
                "experiment_id": experiment_id,
                "status": got["info"]["status"],
                "artifact_uri": got["info"]["artifact_uri"],
                "params": {p["key"]: p["value"] for p in got["data"].get("params", [])},
                "loss_history": [m["value"] for m in sorted(history["metrics"], key=lambda m: m["step"])],
                "notes": notes_back.decode(),
                "weights_ok": weights_ok,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
