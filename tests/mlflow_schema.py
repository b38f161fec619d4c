"""The empty MLflow SQLite store the tests copy, as SQL (``fixtures/mlflow_schema.sql``).

Creating a store runs every one of MLflow's schema migrations (~5 s on 2 cores); loading
their result as SQL takes ~0.05 s. conftest's ``migrated_db`` loads the file when its
alembic revision is the installed MLflow's newest, and migrates otherwise; the slow test
``test_the_committed_schema_is_what_mlflows_migrations_make`` compares the two. After an
MLflow upgrade, write it again: ``.venv/bin/python tests/mlflow_schema.py``.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

SCHEMA_SQL = Path(__file__).parent / "fixtures" / "mlflow_schema.sql"
ARTIFACTS = "/@TEMPLATE_ARTIFACTS@"  # the Default experiment's artifact root, set on load


def migrated(db: Path, artifacts: str) -> None:
    """An empty store at ``db``, made by MLflow's own migrations."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(f"sqlite:///{db}", artifacts).engine.dispose()


def schema(db: Path) -> tuple[list[tuple], str]:
    """What must agree: every table, index and trigger as SQL, and the alembic revision."""
    con = sqlite3.connect(db)
    try:
        objects = sorted((kind, name, clauses(sql))
                         for kind, name, sql in con.execute(
                             "SELECT type, name, sql FROM sqlite_master"))
        (revision,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        con.close()
    return objects, revision


def clauses(sql: str | None) -> tuple[str, ...]:
    """A CREATE statement as its sorted lines, without the commas between them. MLflow's
    batch migrations (a table rebuilt by alembic) write a table's named CHECK constraints in
    an order that changes from one process to the next (CI's run had the two of ``runs``
    the other way round): the same table, a different text."""
    return tuple(sorted(line.strip().rstrip(",").strip()
                        for line in (sql or "").splitlines()))


def load(db: Path, artifacts: Path) -> None:
    con = sqlite3.connect(db)
    try:
        con.executescript(SCHEMA_SQL.read_text().replace(ARTIFACTS, str(artifacts)))
    finally:
        con.close()


def main() -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        migrated(db, ARTIFACTS)
        con = sqlite3.connect(db)
        dump = "\n".join(con.iterdump())
        con.close()
    SCHEMA_SQL.write_text(f"-- An empty MLflow {mlflow.__version__} SQLite store, as its "
                          "migrations leave it: written by tests/mlflow_schema.py\n"
                          + dump + "\n")
    print(f"wrote {SCHEMA_SQL} (revision {schema_revision()})")


def schema_revision() -> str:
    """The alembic revision the committed SQL was made at."""
    for line in SCHEMA_SQL.read_text().splitlines():
        if line.startswith('INSERT INTO "alembic_version"'):
            return line.split("'")[1]
    return ""


if __name__ == "__main__":
    main()
