"""`passthru keys …` and `passthru db upgrade`: the API's operations straight on the store, for admins without curl."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, write_config
from upstream import Upstream

from passthru.cli import main
from passthru.keystore.engine import head_revision

MASTER = "sk-master-for-the-cli"


def entries(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "auth": True}]


@pytest.fixture
def config(tmp_path: Path, upstream: Upstream, database_url: str) -> Path:
    return write_config(tmp_path, entries(upstream), master_key=MASTER, database_url=database_url)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """main(args) → (exit status, the JSON it printed or None, what it said on stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, json.loads(out) if out.strip().startswith(("{", "[")) else out, err


def test_generate_list_info_block_delete(config: Path, capsys: pytest.CaptureFixture[str], serve: Callable[..., str],
                                         upstream: Upstream, database_url: str) -> None:  # fmt: skip
    status, made, _ = run(capsys, "keys", "generate", "--config", str(config), "--key-alias", "ci", "--duration",
                          "7d", "--max-budget", "5", "--rpm-limit", "10", "--allowed-route", "/v1/rerank",
                          "--metadata", '{"team": "a"}', "--tpm-limit", "1000", "--budget-duration", "1mo",
                          "--max-parallel-requests", "4")  # fmt: skip
    assert status == 0
    key = made["key"]
    assert (made["key_alias"], made["max_budget"], made["rpm_limit"], made["allowed_routes"]) == (
        "ci", 5.0, 10, ["/v1/rerank"])  # fmt: skip
    assert made["max_parallel_requests"] == 4
    assert (made["tpm_limit"], made["budget_duration"]) == (1000, "1mo") and made["budget_reset_at"] is not None
    status, listed, _ = run(capsys, "keys", "list", "--config", str(config))
    assert status == 0 and listed["total_count"] == 1
    assert [(k["key_alias"], k["token"]) for k in listed["keys"]] == [("ci", made["token"])]
    assert key not in json.dumps(listed)
    status, info, _ = run(capsys, "keys", "info", "--config", str(config), key)
    assert status == 0 and info["info"]["metadata"] == {"team": "a"}

    # The server and the command share the store: what one does, the other sees.
    base = serve(entries(upstream), master_key=MASTER, database_url=database_url)
    assert call(base, key) == 200
    assert run(capsys, "keys", "block", "--config", str(config), key)[1]["blocked"] is True
    assert call(base, key) == 401
    assert run(capsys, "keys", "unblock", "--config", str(config), made["token"])[1]["blocked"] is False
    assert call(base, key) == 200
    assert run(capsys, "keys", "delete", "--config", str(config), key)[1] == {"deleted_keys": [key]}
    assert call(base, key) == 401


def call(base: str, key: str) -> int:
    return requests.post(f"{base}/v1/rerank", json={}, headers={"Authorization": f"Bearer {key}"},
                         timeout=10).status_code  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["keys", "info", "sk-never-generated-1"], "passthru: no such key", id="unknown"),
        pytest.param(["keys", "delete", "sk-never-generated-1"], "none was deleted", id="delete-unknown"),
        pytest.param(["keys", "generate", "--duration", "soon"], "duration must look like", id="bad-duration"),
        pytest.param(["keys", "generate", "--key", "not-sk"], "key must be sk-", id="bad-key"),
    ],
)
def test_errors_are_one_line_and_exit_1(config: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                        message: str) -> None:  # fmt: skip
    status, out, err = run(capsys, *args[:2], "--config", str(config), *args[2:])
    assert status == 1 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_db_upgrade(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "db", "upgrade", "--config", str(config))
    assert status == 0 and out.strip().endswith(f"at revision {head_revision()}")
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0  # again: nothing to do


def test_without_a_master_key_there_is_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, [])
    for args in (["keys", "list"], ["db", "upgrade"]):
        status, _, err = run(capsys, *args, "--config", str(config))
        assert status == 1 and "virtual keys need general_settings.master_key" in err


def test_a_store_for_route_counts_only_is_migrated_and_holds_no_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, [{"path": "/r", "target": "http://127.0.0.1:9/r", "rpm_limit": 5}],
                          database_url=f"sqlite:///{tmp_path / 'routes.db'}")  # fmt: skip
    status, out, _ = run(capsys, "db", "upgrade", "--config", str(config))
    assert status == 0 and out.strip().endswith(f"at revision {head_revision()}")
    status, _, err = run(capsys, "keys", "list", "--config", str(config))
    assert status == 1 and "virtual keys need general_settings.master_key" in err


def test_unreachable_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, [], master_key=MASTER, database_url="postgresql://u:pw-cli-9@127.0.0.1:1/db")
    status, _, err = run(capsys, "db", "upgrade", "--config", str(config))
    assert status == 1 and "cannot open the key store at postgresql+psycopg://u:***@127.0.0.1:1/db" in err
    assert "pw-cli-9" not in err


def test_the_installed_command_line(config: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "passthru", "keys", "list", "--config", str(config)], cwd=ROOT,
                          capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total_count"] == 0
