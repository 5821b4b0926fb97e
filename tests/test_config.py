"""Config loading: every field, every start-up error, and that no error quotes a secret."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from passthru import create_app
from passthru.config import ALL_METHODS, load_settings, parse_settings
from passthru.errors import ConfigError
from passthru.server_config import load_from_environment

SEED_RERANK = """
general_settings:
  master_key: sk-1234
  pass_through_endpoints:
    - path: "/v1/rerank" # route you want to add to LiteLLM Proxy Server
      target: "https://api.cohere.com/v1/rerank" # URL this route should forward requests to
      headers: # headers to forward to this URL
        Authorization: "bearer os.environ/COHERE_API_KEY" # (Optional) Auth Header to forward to your Endpoint
        content-type: application/json # (Optional) Extra Headers to pass to this endpoint
        accept: application/json
"""
ENV = {"COHERE_API_KEY": "co-secret-123", "LF_PK": "pk-lf-1", "LF_SK": "sk-lf-2", "MK": "sk-master-999"}


def settings_of(entries: list[dict], environ: dict[str, str] | None = None, **general: object):
    raw = {"general_settings": {**general, "pass_through_endpoints": entries}}
    return parse_settings(raw, "cfg.yaml", ENV if environ is None else environ)


def error_of(entries: list[dict], **general: object) -> str:
    with pytest.raises(ConfigError) as info:
        settings_of(entries, **general)
    return str(info.value)


def test_seed_rerank_config_loads_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SEED_RERANK)
    settings = load_settings(path, ENV)
    (ep,) = settings.endpoints
    assert settings.master_key == "sk-1234"
    assert ep.path == "/v1/rerank"
    (target,) = ep.targets
    assert (target.name, target.url_shown, target.weight, target.order) == ("api.cohere.com", target.url, 1, 1)
    assert target.url == "https://api.cohere.com/v1/rerank"
    assert target.headers == ep.headers
    assert ep.headers == (
        ("Authorization", "bearer co-secret-123"),
        ("content-type", "application/json"),
        ("accept", "application/json"),
    )
    assert (ep.retries.num_retries, ep.retries.allowed_fails, ep.retries.cooldown_time) == (0, 3, 30)
    assert ep.retries.retry_on == {429, 500, 502, 503, 504} and ep.retries.retry_body_limit == 1024 * 1024
    assert (ep.auth, ep.forward_headers, ep.include_subpath) == (False, False, False)
    assert ep.methods == ALL_METHODS
    assert ep.timeout == 600.0
    assert ep.default_query_params == ()
    assert ep.cost_per_request == 0.0
    assert {"co-secret-123", "sk-1234"} <= settings.secrets


def test_every_field_is_read() -> None:
    settings = settings_of(
        [
            {
                "path": "/svc/",
                "target": "http://127.0.0.1:9/base?v=2",
                "auth": True,
                "forward_headers": True,
                "include_subpath": True,
                "methods": ["get", "POST", "GET"],
                "timeout": 2.5,
                "default_query_params": {"api-version": "2024-01-01", "n": 3},
                "cost_per_request": 0.25,
            }
        ],
        master_key="os.environ/MK",
    )
    (ep,) = settings.endpoints
    assert ep.path == "/svc"
    assert [target.url for target in ep.targets] == ["http://127.0.0.1:9/base?v=2"]
    assert (ep.auth, ep.forward_headers, ep.include_subpath) == (True, True, True)
    assert ep.methods == ("GET", "POST")
    assert ep.timeout == 2.5
    assert ep.default_query_params == (("api-version", "2024-01-01"), ("n", "3"))
    assert ep.cost_per_request == 0.25
    assert settings.master_key == "sk-master-999"
    assert "sk-master-999" in settings.secrets


def test_env_reference_inside_a_value_and_masked_target() -> None:
    (ep,) = settings_of([{"path": "/g", "target": "https://h.example/v1?key=os.environ/COHERE_API_KEY"}]).endpoints
    (target,) = ep.targets
    assert target.url == "https://h.example/v1?key=co-secret-123"
    assert target.url_shown == "https://h.example/v1?key=***"


def test_langfuse_keys_become_one_basic_authorization() -> None:
    settings = settings_of(
        [
            {
                "path": "/api/public/ingestion",
                "target": "https://us.cloud.langfuse.com/api/public/ingestion",
                "headers": {
                    "LANGFUSE_PUBLIC_KEY": "os.environ/LF_PK",
                    "LANGFUSE_SECRET_KEY": "os.environ/LF_SK",
                },
            }
        ]
    )
    (ep,) = settings.endpoints
    token = base64.b64encode(b"pk-lf-1:sk-lf-2").decode()
    assert ep.headers == (("Authorization", f"Basic {token}"),)
    assert f"Basic {token}" in settings.secrets


def test_other_litellm_sections_are_left_to_litellm() -> None:
    raw = {
        "model_list": [{"model_name": "x"}],
        "litellm_settings": {"drop_params": True},
        "general_settings": {"master_key": "sk-1", "alerting": ["slack"], "pass_through_endpoints": []},
    }
    assert parse_settings(raw, "cfg.yaml", {}).endpoints == ()


def test_warning_for_unauthenticated_route_with_secrets() -> None:
    settings = settings_of(
        [
            {"path": "/open", "target": "http://a.example", "headers": {"Authorization": "os.environ/MK"}},
            {"path": "/plain", "target": "http://a.example", "headers": {"accept": "application/json"}},
            {
                "path": "/closed",
                "target": "http://a.example",
                "auth": True,
                "headers": {"X": "os.environ/MK"},
            },
        ],
        master_key="sk-1",
    )
    (line,) = settings.warnings
    assert "/open" in line and "sk-master-999" not in line


@pytest.mark.parametrize(
    ("entries", "general", "expected"),
    [
        pytest.param([{"target": "http://a"}], {}, "pass_through_endpoints[0].path: is required", id="no-path"),
        pytest.param([{"path": "/x"}], {}, "[0] (/x).target: is required", id="no-target"),
        pytest.param([{"path": "x", "target": "http://a"}], {}, ".path: must start with /", id="path-slash"),
        pytest.param([{"path": "/a/<b>", "target": "http://a"}], {}, ".path: must be a plain URL path", id="path-rule"),
        pytest.param([{"path": "/a/../b", "target": "http://a"}], {}, ".path: must not contain .", id="path-dots"),
        pytest.param([{"path": "/a/%2e%2E/b", "target": "http://a"}], {}, ".path: must not contain .",
                     id="path-escaped-dots"),
        pytest.param([{"path": "/a%2Fb", "target": "http://a"}], {}, ".path: must not hide a slash",
                     id="path-escaped-slash"),
        pytest.param([{"path": 3, "target": "http://a"}], {}, ".path: must be a string", id="path-type"),
        pytest.param([{"path": "/x", "target": "ftp://a/b"}], {}, ".target: must be an http://", id="target-scheme"),
        pytest.param([{"path": "/x", "target": "http://"}], {}, ".target: must be an http://", id="target-host"),
        pytest.param([{"path": "/x", "target": "http://a:99999"}], {}, ".target: is not a valid URL", id="target-port"),
        pytest.param([{"path": "/x", "target": "http://u:p@a"}], {}, ".target: must not carry user", id="userinfo"),
        pytest.param([{"path": "/x", "target": "http://a/#f"}], {}, ".target: must not have a #fragment", id="frag"),
        pytest.param([{"path": "/x", "target": "http://a", "auth": "true"}], {"master_key": "k"},
                     "(/x).auth: must be true or false, not the string 'true' (write true or false without quotes)",
                     id="auth-quoted"),
        pytest.param([{"path": "/x", "target": "http://a", "auth": True}], {},
                     "(/x).auth: is true but general_settings.master_key is not set", id="auth-no-master"),
        pytest.param([{"path": "/x", "target": "http://a", "forward_headers": 1}], {},
                     ".forward_headers: must be true or false", id="forward-headers-type"),
        pytest.param([{"path": "/x", "target": "http://a", "include_subpath": "yes"}], {},
                     ".include_subpath: must be true or false", id="subpath-type"),
        pytest.param([{"path": "/x", "target": "http://a", "methods": ["GET", "TRACE"]}], {},
                     ".methods: 'TRACE' is not one of", id="method-unknown"),
        pytest.param([{"path": "/x", "target": "http://a", "methods": "GET"}], {},
                     ".methods: must be a non-empty list", id="methods-type"),
        pytest.param([{"path": "/x", "target": "http://a", "timeout": 0}], {}, ".timeout: must be a positive",
                     id="timeout-zero"),
        pytest.param([{"path": "/x", "target": "http://a", "timeout": "5s"}], {}, ".timeout: must be a number",
                     id="timeout-type"),
        pytest.param([{"path": "/x", "target": "http://a", "cost_per_request": -1}], {},
                     ".cost_per_request: must be zero or more", id="cost-negative"),
        pytest.param([{"path": "/x", "target": "http://a", "default_query_params": ["a"]}], {},
                     ".default_query_params: must be a mapping", id="query-type"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": "x"}], {}, ".headers: must be a mapping",
                     id="headers-type"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": {"Bad Name": "v"}}], {},
                     ".headers.Bad Name: is not a valid HTTP header name", id="header-name"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": {"X": "a\nb"}}], {},
                     ".headers.X: must not contain line breaks", id="header-crlf"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": {"X": True}}], {},
                     ".headers.X: must be a string, not a boolean", id="header-bool"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": {"X": "1", "x": "2"}}], {},
                     ".headers.x: is given twice", id="header-twice"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": {"LANGFUSE_PUBLIC_KEY": "a"}}], {},
                     "needs LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY both", id="langfuse-half"),
        pytest.param([{"path": "/x", "target": "http://a", "headers": {"X": "os.environ/NOPE"}}], {},
                     "(/x).headers.X: environment variable NOPE is not set", id="env-missing"),
        pytest.param([{"path": "/x", "target": "http://a", "include_subpaths": True}], {},
                     "(/x).include_subpaths: unknown field (did you mean include_subpath?)", id="unknown-field"),
        pytest.param([{"path": "/x", "target": "http://a"}, {"path": "/x/", "target": "http://b"}], {},
                     "pass_through_endpoints[1] (/x).path: duplicates the path of entry [0]", id="duplicate"),
        pytest.param([{"path": "/v1/Chat", "target": "http://a"}, {"path": "/v1/c%68at;x", "target": "http://b"}], {},
                     "pass_through_endpoints[1] (/v1/c%68at;x).path: duplicates the path of entry [0]",
                     id="duplicate-in-another-spelling"),
        pytest.param(["/x"], {}, "pass_through_endpoints[0]: must be a mapping", id="entry-type"),
        pytest.param([], {"master_key": ""}, "general_settings.master_key: must not be empty", id="master-empty"),
        pytest.param([], {"master_key": "os.environ/NOPE"}, "master_key: environment variable NOPE is not set",
                     id="master-env"),
        pytest.param([], {"pass_through_endpoint": []}, "general_settings.pass_through_endpoint: unknown field",
                     id="general-typo"),
    ],
)  # fmt: skip
def test_start_up_errors_name_file_entry_and_field(entries: list, general: dict, expected: str) -> None:
    message = error_of(entries, **general)
    assert message.startswith("cfg.yaml: ")
    assert expected in message
    for secret in ENV.values():
        assert secret not in message


def test_a_passthru_field_at_the_top_level_is_an_error_not_ignored() -> None:
    """Other top-level sections are LiteLLM's and ignored; pass_through_endpoints there would leave no route."""
    for key, value in (("pass_through_endpoints", [{"path": "/x", "target": "http://a"}]), ("master_key", "sk-1")):
        with pytest.raises(ConfigError, match=rf"^cfg.yaml: {key}: belongs under general_settings"):
            parse_settings({key: value, "model_list": []}, "cfg.yaml", {})
    assert parse_settings({"model_list": [], "litellm_settings": {}}, "cfg.yaml", {}).endpoints == ()


def test_pass_through_endpoints_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"general_settings.pass_through_endpoints: must be a list"):
        parse_settings({"general_settings": {"pass_through_endpoints": {"path": "/x"}}}, "cfg.yaml", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("general_settings: [1", "not valid YAML at line", id="bad-yaml"),
        pytest.param("- 1\n- 2\n", "the file must be a mapping", id="not-mapping"),
        pytest.param("general_settings: 3\n", "general_settings: must be a mapping", id="general-type"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings(path, {})
    assert str(path) in str(info.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(missing, {})


def test_error_never_prints_a_resolved_secret() -> None:
    # The value resolves fine but is then refused: the message names the field, not the value.
    environ = {"BAD": "line1\nsecret-tail"}
    with pytest.raises(ConfigError) as info:
        settings_of([{"path": "/x", "target": "http://a", "headers": {"X": "os.environ/BAD"}}], environ)
    assert "secret-tail" not in str(info.value)


# Where a server process finds its config: $PASSTHRU_CONFIG_YAML (the YAML itself), else the file $PASSTHRU_CONFIG.
OTHER_CONFIG = "general_settings:\n  pass_through_endpoints:\n    - {path: /from-file, target: http://a}\n"


def test_config_yaml_variable_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config.yaml here: nothing but the variable can be read
    settings = load_from_environment({"PASSTHRU_CONFIG_YAML": SEED_RERANK, "COHERE_API_KEY": "co-secret-123"})
    assert settings.source == "$PASSTHRU_CONFIG_YAML"
    assert [ep.path for ep in settings.endpoints] == ["/v1/rerank"]
    # os.environ/ references resolve from the same environment, so secrets can stay in their own variables.
    assert settings.endpoints[0].headers[0] == ("Authorization", "bearer co-secret-123")
    assert not any("PASSTHRU_CONFIG " in warning for warning in settings.warnings)


def test_config_yaml_variable_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(OTHER_CONFIG)
    environ = {"PASSTHRU_CONFIG_YAML": SEED_RERANK, "PASSTHRU_CONFIG": str(path), "COHERE_API_KEY": "k"}
    settings = load_from_environment(environ)
    assert [ep.path for ep in settings.endpoints] == ["/v1/rerank"]
    assert settings.warnings[0] == f"$PASSTHRU_CONFIG_YAML is set, so $PASSTHRU_CONFIG ({path}) is not read"


@pytest.mark.parametrize("blank", [pytest.param("", id="empty"), pytest.param(" \n", id="blanks")])
def test_blank_config_yaml_variable_reads_as_unset(tmp_path: Path, blank: str) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(OTHER_CONFIG)
    settings = load_from_environment({"PASSTHRU_CONFIG_YAML": blank, "PASSTHRU_CONFIG": str(path)})
    assert settings.source == str(path)
    assert [ep.path for ep in settings.endpoints] == ["/from-file"]


@pytest.mark.parametrize("environ", [pytest.param({}, id="unset"), pytest.param({"PASSTHRU_CONFIG": ""}, id="empty")])
def test_without_variables_config_yaml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]
) -> None:
    (tmp_path / "config.yaml").write_text(OTHER_CONFIG)
    monkeypatch.chdir(tmp_path)
    settings = load_from_environment(environ)
    assert settings.source == "config.yaml"
    assert [ep.path for ep in settings.endpoints] == ["/from-file"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("general_settings: [1", r"^\$PASSTHRU_CONFIG_YAML: not valid YAML at line 1", id="bad-yaml"),
        pytest.param(
            "general_settings:\n  pass_through_endpoints:\n    - {path: /x, target: ftp://a}\n",
            r"^\$PASSTHRU_CONFIG_YAML: general_settings.pass_through_endpoints\[0\] \(/x\).target: must be an http",
            id="bad-field",
        ),
        pytest.param(
            "general_settings:\n  master_key: os.environ/NOT_SET_ANYWHERE\n",
            r"^\$PASSTHRU_CONFIG_YAML: general_settings.master_key: environment variable NOT_SET_ANYWHERE is not set",
            id="missing-variable",
        ),
    ],
)
def test_config_yaml_variable_errors_name_the_variable(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(OTHER_CONFIG)
    with pytest.raises(ConfigError, match=expected) as info:
        load_from_environment({"PASSTHRU_CONFIG_YAML": text, "PASSTHRU_CONFIG": str(path)})
    assert str(path) not in str(info.value)


def test_create_app_default_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PASSTHRU_CONFIG", raising=False)
    monkeypatch.setenv(
        "PASSTHRU_CONFIG_YAML", OTHER_CONFIG.replace("target: http://a", "target: http://a, methods: [POST]")
    )
    client = create_app().test_client()
    assert client.get("/from-file").status_code == 405  # the route is there (and nothing is sent to http://a)
    assert client.get("/elsewhere").status_code == 404


# --- the key store's URL and the key API's paths -------------------------------------------------------------


def test_master_key_alone_selects_the_embedded_sqlite_store() -> None:
    settings = settings_of([], master_key="sk-1")
    assert settings.database_url == "sqlite:///passthru.db"
    assert settings_of([]).database_url is None  # no master key, no virtual keys, no store


@pytest.mark.parametrize(
    ("value", "url", "shown"),
    [
        pytest.param("postgresql://u:pw-secret-1@db.example:5432/litellm",
                     "postgresql+psycopg://u:pw-secret-1@db.example:5432/litellm",
                     "postgresql+psycopg://u:***@db.example:5432/litellm", id="prisma-style"),
        pytest.param("postgres://u:pw-secret-1@db.example/l", "postgresql+psycopg://u:pw-secret-1@db.example/l",
                     "postgresql+psycopg://u:***@db.example/l", id="postgres-scheme"),
        pytest.param("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db",
                     id="psycopg"),
        pytest.param("postgresql:///db", "postgresql+psycopg:///db", "postgresql+psycopg:///db", id="unix-socket"),
        pytest.param("sqlite:////var/lib/passthru/keys.db", "sqlite:////var/lib/passthru/keys.db",
                     "sqlite:////var/lib/passthru/keys.db", id="sqlite-absolute"),
    ],
)  # fmt: skip
def test_database_url_forms(value: str, url: str, shown: str) -> None:
    settings = settings_of([], master_key="sk-1", database_url=value)
    assert (settings.database_url, settings.database_shown) == (url, shown)
    assert value in settings.secrets
    if "pw-secret-1" in value:
        assert "pw-secret-1" in settings.secrets  # masked alone too, wherever a driver message quotes it


@pytest.mark.parametrize(
    "value",
    ["postgresql://u:p%40ss:w0rd@db.example:5432/litellm?sslmode=require&application_name=passthru",
     "postgres://u@[::1]:5433/db", "postgresql://u:@h/db", "postgresql+psycopg://h/d%20b?options=-csearch_path%3Ds",
     "sqlite:///relative/keys.db", "sqlite+pysqlite:////abs/keys.db?timeout=3"],
)  # fmt: skip
def test_database_url_reads_as_sqlalchemy_reads_it(value: str) -> None:
    """keystore/url.py checks the URL without SQLAlchemy (the master never imports it): both must read it the same."""
    settings = settings_of([], master_key="sk-1", database_url=value)
    assert settings.database_url is not None and settings.database_shown is not None
    ours, theirs = make_url(settings.database_url), make_url(value)
    assert ours == theirs.set(drivername=ours.drivername)
    assert ours.get_backend_name() in ("postgresql", "sqlite")
    hidden = ours if ours.password is None else ours.set(password="***")
    assert make_url(settings.database_shown) == hidden
    if theirs.password:
        assert theirs.password in settings.secrets


def test_database_url_from_the_environment_and_litellms_variable() -> None:
    environ = {**ENV, "DB": "postgresql://u:pw-2@h/db", "DATABASE_URL": "postgresql://u:pw-3@h2/db"}
    from_config = settings_of([], environ, master_key="sk-1", database_url="os.environ/DB")
    assert from_config.database_url == "postgresql+psycopg://u:pw-2@h/db"
    from_env = settings_of([], environ, master_key="sk-1")
    assert from_env.database_url == "postgresql+psycopg://u:pw-3@h2/db"
    assert {"pw-3", "postgresql://u:pw-3@h2/db"} <= from_env.secrets


def test_database_url_without_master_key_is_unused_and_said_so() -> None:
    settings = settings_of([], database_url="sqlite:///x.db")
    assert settings.database_url is None
    (warning,) = settings.warnings
    assert "database_url is set but unused" in warning


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("mysql://u@h/db", "general_settings.database_url: uses 'mysql'", id="mysql"),
        pytest.param("sqlite://", "must name a file", id="sqlite-memory"),
        pytest.param("sqlite:///:memory:", "must name a file", id="sqlite-memory-explicit"),
        pytest.param("postgresql+psycopg2://u@h/db", "uses the driver 'psycopg2'", id="psycopg2"),
        pytest.param("not a url", "is not a database URL", id="garbage"),
        pytest.param("postgresql://u@h:54x/db", "is not a database URL", id="port-not-a-number"),
        pytest.param("postgresql://u@h:/db", "is not a database URL", id="port-empty"),
        pytest.param("sqlite:///%3Amemory%3A", "must name a file", id="sqlite-memory-escaped"),
        pytest.param(["x"], "must be a string", id="list"),
    ],
)
def test_bad_database_urls(value: object, expected: str) -> None:
    message = error_of([], master_key="sk-1", database_url=value)
    assert expected in message


def test_bad_database_url_in_the_environment_is_named() -> None:
    with pytest.raises(ConfigError, match=r"DATABASE_URL \(environment\): uses 'mysql'"):
        settings_of([], {"DATABASE_URL": "mysql://u:pw@h/db"}, master_key="sk-1")


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param({"path": "/key/generate", "target": "http://a"}, id="exact"),
        pytest.param({"path": "/spend/logs", "target": "http://a"}, id="spend-logs"),
        pytest.param({"path": "/key", "target": "http://a", "include_subpath": True}, id="prefix"),
        pytest.param({"path": "/global/spend/report", "target": "http://a"}, id="spend-report"),
        pytest.param({"path": "/global", "target": "http://a", "include_subpath": True}, id="report-prefix"),
        pytest.param({"path": "/ui", "target": "http://a"}, id="admin-page"),
        pytest.param({"path": "/ui/keys/x", "target": "http://a"}, id="below-the-admin-page"),
    ],
)
def test_pass_through_routes_may_not_cover_the_key_api(entry: dict) -> None:
    message = error_of([entry], master_key="sk-1")
    assert ".path: clashes with passthru's built-in route /" in message
    settings_of([entry])  # without a master key there is no key API to cover


def test_routes_beside_the_key_api_are_fine() -> None:
    entries = [{"path": "/key", "target": "http://a"}, {"path": "/keys", "target": "http://a", "include_subpath": True},
               {"path": "/key/generate2", "target": "http://a"}, {"path": "/uix", "target": "http://a"}]  # fmt: skip
    assert len(settings_of(entries, master_key="sk-1").endpoints) == 4


def test_numbers_yaml_reads_as_strings_are_read_as_the_numbers_they_say(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-6 and 2.5e6 as strings: a price or timeout written so is still its number."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "general_settings:\n  model_prices: {m: {input_cost_per_token: 1e-6}}\n  pass_through_endpoints:\n"
        "    - {path: /a, target: 'http://x', timeout: 2.5e1, cost_per_request: '0.5', output_cost_per_token: 3E-7}\n"
    )
    settings = load_settings(path)
    (endpoint,) = settings.endpoints
    assert (endpoint.timeout, endpoint.cost_per_request, endpoint.prices.output) == (25.0, 0.5, 3e-7)
    assert settings.model_prices["m"].input == 1e-6
    path.write_text("general_settings:\n  pass_through_endpoints:\n"
                    "    - {path: /a, target: 'http://x', timeout: nan}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"timeout: must be a number, not the string 'nan'"):
        load_settings(path)
