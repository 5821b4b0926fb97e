"""`target` and `targets` with their retry policy (config_targets.py): every field read, every start-up error one line
naming the field and never quoting a secret, and `passthru check` listing the targets by name."""

from __future__ import annotations

import pytest

from passthru import cli
from passthru.config import parse_settings
from passthru.errors import ConfigError

ENV = {"KEY_A": "sk-a-secret-0001", "KEY_B": "sk-b-secret-0002", "HOST": "secret-host.example"}
A = {"url": "https://api.openai.com/v1/chat/completions", "name": "openai-a", "weight": 3,
     "headers": {"Authorization": "Bearer os.environ/KEY_A"}}  # fmt: skip
B = {"url": "https://api.openai.com/v1/chat/completions", "name": "openai-b",
     "headers": {"authorization": "Bearer os.environ/KEY_B"}}  # fmt: skip
BACKUP = {"url": "http://backup.example:8080/v1/chat/completions?tier=2", "order": 2}


def endpoint_of(**entry: object):
    raw = {"general_settings": {"pass_through_endpoints": [{"path": "/chat", **entry}]}}
    return parse_settings(raw, "cfg.yaml", ENV).endpoints[0]


def error_of(**entry: object) -> str:
    with pytest.raises(ConfigError) as info:
        endpoint_of(**entry)
    return str(info.value)


def test_targets_with_their_names_weights_orders_and_merged_headers() -> None:
    ep = endpoint_of(targets=[A, B, BACKUP], headers={"Authorization": "route", "X-Route": "1"},
                     num_retries=2, retry_on=[429, 503], allowed_fails=5, cooldown_time=7.5,
                     retry_body_limit=0)  # fmt: skip
    a, b, backup = ep.targets
    assert (a.name, a.weight, a.order) == ("openai-a", 3, 1)
    assert (b.name, b.weight, b.order) == ("openai-b", 1, 1)
    # No name: the URL's host and port, as written.
    assert (backup.name, backup.weight, backup.order) == ("backup.example:8080", 1, 2)
    assert backup.url == "http://backup.example:8080/v1/chat/completions?tier=2"
    # A target's header replaces the route's of the same name (in any case); the route's others stay.
    assert a.headers == (("X-Route", "1"), ("Authorization", "Bearer sk-a-secret-0001"))
    assert b.headers == (("X-Route", "1"), ("authorization", "Bearer sk-b-secret-0002"))
    assert backup.headers == (("Authorization", "route"), ("X-Route", "1"))
    assert ep.headers == (("Authorization", "route"), ("X-Route", "1"))
    retries = ep.retries
    assert (retries.num_retries, retries.allowed_fails, retries.cooldown_time, retries.retry_body_limit) == (
        2, 5, 7.5, 0)  # fmt: skip
    assert retries.retry_on == {429, 503}


def test_defaults_num_retries_is_the_other_targets() -> None:
    assert endpoint_of(targets=[A, B, BACKUP]).retries.num_retries == 2
    assert endpoint_of(targets=[A]).retries.num_retries == 0
    assert endpoint_of(target="http://a.example/x").retries.num_retries == 0
    assert endpoint_of(target="http://a.example/x", num_retries=3).retries.num_retries == 3


def test_a_name_never_comes_from_the_environment() -> None:
    ep = endpoint_of(targets=[{"url": "https://os.environ/HOST/v1"}, {"url": "https://b.example/v1"}])
    assert [target.name for target in ep.targets] == ["targets[0]", "b.example"]
    assert ep.targets[0].url_shown == "https://***/v1"
    assert endpoint_of(target="https://os.environ/HOST/v1").targets[0].name == "target"


def test_an_unauthenticated_route_whose_target_injects_a_secret_is_warned_about() -> None:
    raw = {"general_settings": {"pass_through_endpoints": [{"path": "/chat", "targets": [{"url": "http://a.x"}, B]}]}}
    (warning,) = parse_settings(raw, "cfg.yaml", ENV).warnings
    assert "route /chat injects secrets" in warning


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param({"target": "http://a", "targets": [A]}, ".targets: cannot be given together with target",
                     id="both"),
        pytest.param({}, ".target: is required (or targets: a list of one or more)", id="neither"),
        pytest.param({"targets": []}, ".targets: must be a non-empty list", id="empty"),
        pytest.param({"targets": "http://a"}, ".targets: must be a non-empty list of targets with a url, not the "
                     "string 'http://a'", id="not-a-list"),
        pytest.param({"targets": ["http://a"]}, ".targets[0]: must be a mapping with a url", id="not-a-mapping"),
        pytest.param({"targets": [{"name": "x"}]}, ".targets[0].url: is required", id="no-url"),
        pytest.param({"targets": [A, {"url": "ftp://b"}]}, ".targets[1].url: must be an http://", id="url-scheme"),
        pytest.param({"targets": [{"url": "http://a", "weigth": 2}]},
                     ".targets[0].weigth: unknown field (did you mean weight?)", id="unknown-field"),
        pytest.param({"targets": [{"url": "http://a", "weight": 0}]}, ".targets[0].weight: must be a positive",
                     id="weight-zero"),
        pytest.param({"targets": [{"url": "http://a", "weight": -2}]}, ".targets[0].weight: must be a positive",
                     id="weight-negative"),
        pytest.param({"targets": [{"url": "http://a", "order": 0}]}, ".targets[0].order: must be 1 or more",
                     id="order-zero"),
        pytest.param({"targets": [{"url": "http://a", "order": 1.5}]}, ".targets[0].order: must be a whole number",
                     id="order-float"),
        pytest.param({"targets": [{"url": "http://a", "name": "a b"}]}, ".targets[0].name: must be 1 to 64",
                     id="name-space"),
        pytest.param({"targets": [{"url": "http://a", "name": ""}]}, ".targets[0].name: must be 1 to 64",
                     id="name-empty"),
        pytest.param({"targets": [{"url": "http://a/1"}, {"url": "http://a/2"}]},
                     ".targets[1].name: 'a' is already the name of targets[0]: give each target a name of its own",
                     id="names-clash"),
        pytest.param({"targets": [{"url": "http://a", "headers": {"X": "os.environ/NOPE"}}]},
                     ".targets[0].headers.X: environment variable NOPE is not set", id="header-unset-variable"),
        pytest.param({"targets": [{"url": "http://a", "headers": {"Bad Name": "v"}}]},
                     ".targets[0].headers.Bad Name: is not a valid HTTP header name", id="header-name"),
        pytest.param({"targets": [{"url": "os.environ/NOPE"}]}, ".targets[0].url: environment variable NOPE",
                     id="url-unset-variable"),
        pytest.param({"target": "http://a", "retry_on": [429, 600]},
                     ".retry_on: 600 is not an HTTP error status (400 to 599)", id="retry-on-600"),
        pytest.param({"target": "http://a", "retry_on": [200]}, ".retry_on: 200 is not an HTTP error status",
                     id="retry-on-200"),
        pytest.param({"target": "http://a", "retry_on": ["429"]}, ".retry_on: the string '429' is not an HTTP",
                     id="retry-on-string"),
        pytest.param({"target": "http://a", "retry_on": 429}, ".retry_on: must be a list of HTTP statuses",
                     id="retry-on-number"),
        pytest.param({"target": "http://a", "num_retries": -1}, ".num_retries: must be 0 or more",
                     id="num-retries-negative"),
        pytest.param({"target": "http://a", "num_retries": True}, ".num_retries: must be a whole number, not a "
                     "boolean", id="num-retries-bool"),
        pytest.param({"target": "http://a", "allowed_fails": 0}, ".allowed_fails: must be 1 or more",
                     id="allowed-fails-zero"),
        pytest.param({"target": "http://a", "cooldown_time": -1}, ".cooldown_time: must be zero or more",
                     id="cooldown-negative"),
        pytest.param({"target": "http://a", "retry_body_limit": "1MB"}, ".retry_body_limit: must be a whole number",
                     id="body-limit-string"),
    ],
)  # fmt: skip
def test_start_up_errors_name_the_field(entry: dict[str, object], expected: str) -> None:
    message = error_of(**entry)
    assert message.startswith("cfg.yaml: general_settings.pass_through_endpoints[0] (/chat")
    assert expected in message
    assert "\n" not in message
    for secret in ENV.values():
        assert secret not in message


def test_check_lists_each_routes_targets_by_name_with_masked_headers(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "config.yaml"
    config.write_text(
        "general_settings:\n  pass_through_endpoints:\n"
        "    - path: /chat\n      num_retries: 1\n      targets:\n"
        "        - {url: 'https://api.openai.com/v1/chat?key=os.environ/KEY_A', name: openai-a, weight: 3,"
        " headers: {Authorization: 'Bearer os.environ/KEY_A'}}\n"
        "        - {url: 'http://backup.example/v1/chat', order: 2}\n"
        "    - path: /one\n      target: http://one.example/x\n      headers: {X-Key: os.environ/KEY_B}\n"
    )
    assert cli.check(str(config)) == 0
    out, err = capsys.readouterr()
    assert "/chat -> 2 targets  [" in out and "num_retries=1" in out
    assert "openai-a: https://api.openai.com/v1/chat?key=***  order=1 weight=3\n          Authorization: ***" in out
    assert "backup.example: http://backup.example/v1/chat  order=2 weight=1\n" in out
    assert "/one -> http://one.example/x  [" in out and "\n      X-Key: ***\n" in out
    for secret in ENV.values():
        assert secret not in out + err
