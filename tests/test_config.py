"""Settings from environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from actionloop.config import SETTINGS, Config, from_env


def test_defaults_match_the_reference() -> None:
    """Port 8080, ./action, nothing optional turned on."""
    config = from_env({})
    assert config == Config()
    assert config.port == 8080 and config.action_dir == Path("action") and not config.websocket


def test_variables() -> None:
    """Each kind of setting parses from its variable."""
    config = from_env(
        {
            "OW_PORT": "9000",
            "OW_WEBSOCKET": "/hello",
            "OW_WEBSOCKET_ORIGIN": "a.example.com, https://b.example.com",
            "OW_WAIT_FOR_ACK": "1",
            "OW_LOG_INIT_ERROR": "",
            "OW_START_TIMEOUT": "2.5",
            "OW_ACTION_DIR": "/tmp/x",
        }
    )
    assert config.port == 9000 and config.websocket == "/hello"
    assert config.origins == ("a.example.com", "https://b.example.com")
    assert config.wait_for_ack is True and config.log_init_error is False
    assert config.start_timeout == 2.5 and config.action_dir == Path("/tmp/x")


def test_bad_number_names_the_variable() -> None:
    """A malformed number is refused, naming the variable."""
    with pytest.raises(ValueError, match="OW_PORT"):
        from_env({"OW_PORT": "eighty"})


def test_every_setting_is_a_field() -> None:
    """The settings table and the Config fields cannot drift apart."""
    fields = set(Config.__dataclass_fields__)
    assert {s.field for s in SETTINGS} <= fields


def test_readme_lists_every_setting() -> None:
    """The README's settings table names every variable and every flag."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env}`" in readme, setting.env
        if setting.field != "debug":
            assert f"`--{setting.field.replace('_', '-')}" in readme, setting.field


@pytest.mark.parametrize(
    ("autoinit", "sha256", "ok"),
    [
        ("https://example.com/a.zip", "A" * 64, True),
        ("http://127.0.0.1:9/a.zip", "0" * 64, True),
        ("/code/a.zip", "0" * 64, True),
        ("/code/a.zip", "", True),
        ("https://example.com/a.zip", "", False),
        ("https://example.com/a.zip", "0" * 63, False),
        ("file:///code/a.zip", "0" * 64, False),
        ("HTTPS://example.com/a.zip", "0" * 64, True),
        ("https://example.com/a b.zip", "0" * 64, False),
        ("https://u:p@[::1/a.zip", "0" * 64, False),
        ("https:///a.zip", "0" * 64, False),
        ("https://example.com:99999/a.zip", "0" * 64, False),
    ],
)
def test_autoinit_url_needs_a_sha256(autoinit: str, sha256: str, ok: bool) -> None:
    """A URL is a setting only with a well-formed OW_AUTOINIT_SHA256; other schemes never."""
    env = {"OW_AUTOINIT": autoinit, "OW_AUTOINIT_SHA256": sha256}
    if ok:
        assert from_env(env).autoinit == autoinit
    else:
        with pytest.raises(ValueError, match="OW_AUTOINIT"):
            from_env(env)


@pytest.mark.parametrize("autoinit", [None, ""], ids=["unset", "empty"])
def test_autoinit_sha256_needs_autoinit(autoinit: str | None) -> None:
    """OW_AUTOINIT_SHA256 without OW_AUTOINIT (unset, or empty as an image built without ACTION sets it)
    is a bad setting naming both, not a runtime that quietly serves no action."""
    env = {"OW_AUTOINIT_SHA256": "0" * 64} | ({} if autoinit is None else {"OW_AUTOINIT": autoinit})
    with pytest.raises(ValueError, match="OW_AUTOINIT_SHA256 is set but OW_AUTOINIT is not"):
        from_env(env)


def test_flags_complete_the_environment() -> None:
    """Flags join the environment before the checks: OW_AUTOINIT_SHA256 in the environment with the file
    of `actionloop serve FILE` (or --autoinit) is a setting, and a flag of None leaves a variable alone."""
    config = from_env({"OW_AUTOINIT_SHA256": "0" * 64, "OW_PORT": "9000"}, {"autoinit": "a.py", "port": None})
    assert (config.autoinit, config.autoinit_sha256, config.port) == ("a.py", "0" * 64, 9000)


@pytest.mark.parametrize("path", ["hello", "/a//b", "/a/./b", "/a/..", "/x?y", "/x#y", "/a b", "/%41"])
def test_websocket_path_checked(path: str) -> None:
    """OW_WEBSOCKET is an absolute path without empty, . or .. segments, query, fragment or escapes."""
    with pytest.raises(ValueError, match="OW_WEBSOCKET"):
        from_env({"OW_WEBSOCKET": path})
    assert from_env({"OW_WEBSOCKET": "/hello/ws"}).websocket == "/hello/ws"


def test_secret_free_messages_for_bad_urls() -> None:
    """A refused URL's message shows neither its password nor its query."""
    for url in ["https://u:pw-123@ex.com/a b?sig=sig-456", "http://u:pw-123@[::1/x?sig=sig-456"]:
        with pytest.raises(ValueError) as caught:
            from_env({"OW_AUTOINIT": url, "OW_AUTOINIT_SHA256": "0" * 64})
        assert "pw-123" not in str(caught.value) and "sig-456" not in str(caught.value)
