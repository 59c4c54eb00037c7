"""Make MLflow's tables in an empty database, or bring an older schema up to this MLflow's version.

Prints one word: `created`, `upgraded` or `current` (the role's changed_when reads it). The backend
store URI is the first argument; the password comes from libpq's PGPASSFILE, never from the URI.
Run before the server starts, so its gunicorn workers never race to make the tables.
"""

from __future__ import annotations

import sys

from mlflow.store.db import utils


def main() -> int:
    engine = utils.create_sqlalchemy_engine_with_retry(sys.argv[1])
    if not utils._all_tables_exist(engine):
        utils._initialize_tables(engine)
        print("created")
    elif utils._get_schema_version(engine) != utils._get_latest_schema_revision():
        utils._upgrade_db(engine)
        print("upgraded")
    else:
        print("current")
    utils._verify_schema(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
