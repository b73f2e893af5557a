"""Unit tests for ldapproxy.config: loading, defaults, and one-line errors naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldapproxy import config
from ldapproxy.config import ConfigError, ListenerTLS, UpstreamURL

LISTENER = '[[listener]]\nendpoint = "tcp:389"\ntls = "none"\n'
UPSTREAM = '[upstream]\nurls = ["ldaps://dc1.example.com"]\n'
TLS = '[tls]\ncertificate = "/etc/ldapproxy/cert.pem"\nprivate_key = "/etc/ldapproxy/key.pem"\n'

#: The smallest useful configuration: one listener with the default tls mode.
MINIMAL = '[[listener]]\nendpoint = "tcp:389"\n' + TLS + UPSTREAM


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ldapproxy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_minimal_config_loads(tmp_path: Path) -> None:
    """A listener endpoint, a certificate and an upstream URL are a complete configuration."""
    path = write(tmp_path, MINIMAL)
    loaded = config.load(path)
    assert loaded.path == path
    assert [(lc.endpoint, lc.tls) for lc in loaded.listeners] == [
        ("tcp:389", ListenerTLS.STARTTLS_OPTIONAL)
    ]
    assert loaded.upstream.urls == (UpstreamURL("ldaps", "dc1.example.com", 636),)
    assert loaded.tls.certificate == Path("/etc/ldapproxy/cert.pem")
    assert loaded.tls.private_key == Path("/etc/ldapproxy/key.pem")


def test_every_default_is_applied(tmp_path: Path) -> None:
    """Every key left out takes its documented default, with the documented type."""
    loaded = config.load(write(tmp_path, MINIMAL))
    listener = loaded.listeners[0]
    defaults = {
        "listener.name": listener.name,
        "listener.tls": listener.tls,
        "tls.min_version": loaded.tls.min_version,
        "tls.ciphers": loaded.tls.ciphers,
        "upstream.ca_file": loaded.upstream.ca_file,
        "upstream.tls_server_name": loaded.upstream.tls_server_name,
        "upstream.client_certificate": loaded.upstream.client_certificate,
        "upstream.client_key": loaded.upstream.client_key,
        "upstream.connect_timeout": loaded.upstream.connect_timeout,
        "upstream.strategy": loaded.upstream.strategy,
        "pool.min_idle": loaded.pool.min_idle,
        "pool.max_size": loaded.pool.max_size,
        "pool.acquire_timeout": loaded.pool.acquire_timeout,
        "pool.idle_timeout": loaded.pool.idle_timeout,
        "pool.max_lifetime": loaded.pool.max_lifetime,
        "pool.health_check_interval": loaded.pool.health_check_interval,
        "limits.max_pdu_bytes": loaded.limits.max_pdu_bytes,
        "limits.idle_timeout": loaded.limits.idle_timeout,
        "limits.tls_handshake_timeout": loaded.limits.tls_handshake_timeout,
        "limits.plugin_timeout": loaded.limits.plugin_timeout,
        "limits.drain_timeout": loaded.limits.drain_timeout,
        "limits.max_connections": loaded.limits.max_connections,
        "limits.max_connections_per_ip": loaded.limits.max_connections_per_ip,
        "limits.max_pending_ops": loaded.limits.max_pending_ops,
        "limits.first_request_timeout": loaded.limits.first_request_timeout,
        "limits.operation_timeout": loaded.limits.operation_timeout,
        "listener.proxy_protocol": loaded.listeners[0].proxy_protocol,
        "listener.trusted_proxies": loaded.listeners[0].trusted_proxies,
        "pool.warm_timeout": loaded.pool.warm_timeout,
        "metrics.endpoint": loaded.metrics.endpoint,
        "log.format": loaded.log.format,
        "log.level": loaded.log.level,
        "process.workers": loaded.process.workers,
    }
    assert defaults == {
        "listener.name": "listener0",
        "listener.tls": ListenerTLS.STARTTLS_OPTIONAL,
        "tls.min_version": "1.2",
        "tls.ciphers": "",
        "upstream.ca_file": None,
        "upstream.tls_server_name": "",
        "upstream.client_certificate": None,
        "upstream.client_key": None,
        "upstream.connect_timeout": 5.0,
        "upstream.strategy": "failover",
        "pool.min_idle": 4,
        "pool.max_size": 200,
        "pool.acquire_timeout": 5.0,
        "pool.idle_timeout": 300.0,
        "pool.max_lifetime": 3600.0,
        "pool.health_check_interval": 30.0,
        "limits.max_pdu_bytes": 1048576,
        "limits.idle_timeout": 900.0,
        "limits.tls_handshake_timeout": 10.0,
        "limits.plugin_timeout": 10.0,
        "limits.drain_timeout": 30.0,
        "limits.max_connections": 10000,
        "limits.max_connections_per_ip": 0,
        "limits.max_pending_ops": 100,
        "limits.first_request_timeout": 10.0,
        "limits.operation_timeout": 120.0,
        "listener.proxy_protocol": False,
        "listener.trusted_proxies": (),
        "pool.warm_timeout": 10.0,
        "metrics.endpoint": "",
        "log.format": "text",
        "log.level": "info",
        "process.workers": 1,
    }
    for key in ("upstream.connect_timeout", "limits.idle_timeout", "limits.tls_handshake_timeout"):
        assert type(defaults[key]) is float, key
    # Without a TLS listener the [tls] table may be left out: no certificate, no key.
    bare = config.load(write(tmp_path, LISTENER + UPSTREAM)).tls
    assert (bare.certificate, bare.private_key) == (None, None)
    # Every optional key of the option table is checked above; the rest are required.
    optional = {o.dotted for o in config.OPTIONS if not o.required}
    assert optional == set(defaults) | {"tls.certificate", "tls.private_key"}
    required = {o.dotted for o in config.OPTIONS if o.required}
    assert required == {"listener.endpoint", "upstream.urls"}


def test_default_listener_names_follow_position(tmp_path: Path) -> None:
    """Unnamed listeners are called listener0, listener1... in file order."""
    text = LISTENER + '[[listener]]\nname = "admin"\nendpoint = "tcp:390"\ntls = "none"\n'
    text += LISTENER.replace("389", "391") + UPSTREAM
    loaded = config.load(write(tmp_path, text))
    assert [lc.name for lc in loaded.listeners] == ["listener0", "admin", "listener2"]


def test_every_key_set_explicitly(tmp_path: Path) -> None:
    """Every key can be set, and each value arrives parsed into its Python type."""
    text = """
[[listener]]
name = "ldaps"
endpoint = "tcp:636:interface=127.0.0.1"
tls = "ldaps"

[[listener]]
name = "required"
endpoint = 'tcp:3389:interface=\\:\\:1'
tls = "starttls-required"

[tls]
certificate = "/c.pem"
private_key = "/k.pem"
min_version = "1.3"
ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256"

[upstream]
urls = ["ldap://[::1]:1389", "LDAPS://DC2.Example.com/"]
ca_file = "/ca.pem"
tls_server_name = "ldap.example.com"
client_certificate = "/cc.pem"
client_key = "/ck.pem"
connect_timeout = 2.5
strategy = "round-robin"

[pool]
min_idle = 0
max_size = 3
acquire_timeout = 0.25
idle_timeout = 10
max_lifetime = 20
health_check_interval = 5

[limits]
max_pdu_bytes = 2048
idle_timeout = 60
tls_handshake_timeout = 0.5
max_connections = 500
max_connections_per_ip = 20
max_pending_ops = 8
first_request_timeout = 3
operation_timeout = 0
"""
    loaded = config.load(write(tmp_path, text))
    assert [(lc.name, lc.endpoint, lc.tls) for lc in loaded.listeners] == [
        ("ldaps", "tcp:636:interface=127.0.0.1", ListenerTLS.LDAPS),
        ("required", "tcp:3389:interface=\\:\\:1", ListenerTLS.STARTTLS_REQUIRED),
    ]
    assert loaded.tls == config.ServerTLSConfig(
        Path("/c.pem"), Path("/k.pem"), "1.3", "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    assert loaded.upstream == config.UpstreamConfig(
        (UpstreamURL("ldap", "::1", 1389), UpstreamURL("ldaps", "dc2.example.com", 636)),
        Path("/ca.pem"),
        "ldap.example.com",
        Path("/cc.pem"),
        Path("/ck.pem"),
        2.5,
        "round-robin",
    )
    assert loaded.pool == config.PoolConfig(0, 3, 0.25, 10.0, 20.0, 5.0)
    assert [str(u) for u in loaded.upstream.urls] == [
        "ldap://[::1]:1389",
        "ldaps://dc2.example.com:636",
    ]
    assert loaded.limits == config.LimitsConfig(
        2048,
        60.0,
        0.5,
        10.0,
        max_connections=500,
        max_connections_per_ip=20,
        max_pending_ops=8,
        first_request_timeout=3.0,
        operation_timeout=0.0,
    )


def test_systemd_endpoint_is_accepted_unparsed(tmp_path: Path) -> None:
    """A systemd: endpoint is left for the listener to resolve from the environment."""
    text = LISTENER.replace("tcp:389", "systemd:domain=INET:index=0") + UPSTREAM
    assert config.load(write(tmp_path, text)).listeners[0].endpoint == (
        "systemd:domain=INET:index=0"
    )


def test_every_option_default_is_valid() -> None:
    """Each optional key's default passes its own parser."""
    for option in config.OPTIONS:
        if not option.required:
            option.parse(option.default)


# -- errors ------------------------------------------------------------------------------

ERRORS = [
    # sections and keys
    pytest.param(
        LISTENER + UPSTREAM + '[logging]\nlevel = "debug"\n',
        [
            "unknown section [logging]",
            "expected one of [listener], [tls], [upstream], [pool], [limits]",
        ],
        id="unknown-section",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nidle = 5\n",
        ["[limits] unknown key 'idle'", "expected one of", "idle_timeout"],
        id="unknown-key-in-table",
    ),
    pytest.param(
        LISTENER + UPSTREAM.replace("urls", "url"),
        ["[upstream] unknown key 'url'", "expected one of", "urls"],
        id="unknown-key-upstream",
    ),
    pytest.param(
        LISTENER + LISTENER.replace("389", "390") + "port = 390\n" + UPSTREAM,
        ["[[listener]] #2 unknown key 'port'", "expected one of name, endpoint, tls"],
        id="unknown-key-in-second-listener",
    ),
    pytest.param(
        'tls = "yes"\n' + LISTENER + UPSTREAM, ["[tls] must be a table"], id="table-not-a-table"
    ),
    # wrong types
    pytest.param(
        LISTENER + UPSTREAM + '[limits]\nidle_timeout = "900"\n',
        ["[limits] idle_timeout = '900'", "expected a number of seconds"],
        id="string-for-number",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "connect_timeout = true\n",
        ["[upstream] connect_timeout = True", "expected a number of seconds"],
        id="bool-for-number",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_pdu_bytes = true\n",
        ["[limits] max_pdu_bytes = True", "expected an integer number of bytes"],
        id="bool-for-integer",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_pdu_bytes = 4096.0\n",
        ["[limits] max_pdu_bytes = 4096.0", "expected an integer number of bytes"],
        id="float-for-integer",
    ),
    pytest.param(
        LISTENER + 'name = ["a", "b"]\n' + UPSTREAM,
        ["[[listener]] #1 name = ['a', 'b']", "expected a string"],
        id="list-for-string",
    ),
    pytest.param(
        LISTENER + UPSTREAM + '[tls]\ncertificate = ["/c.pem"]\n',
        ["[tls] certificate = ['/c.pem']", "expected a string"],
        id="list-for-path",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "tls_server_name = 5\n",
        ["[upstream] tls_server_name = 5", "expected a string"],
        id="number-for-string",
    ),
    # limits
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_connections = 0\n",
        ["[limits] max_connections = 0", "expected an integer from 1 to 1000000"],
        id="no-connections",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_connections_per_ip = -1\n",
        ["[limits] max_connections_per_ip = -1", "expected an integer from 0 to 1000000"],
        id="negative-per-ip",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_pending_ops = 0\n",
        ["[limits] max_pending_ops = 0", "expected an integer from 1 to 100000"],
        id="no-pending-ops",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nfirst_request_timeout = 0\n",
        ["[limits] first_request_timeout = 0", "greater than 0"],
        id="zero-first-request-timeout",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\noperation_timeout = -5\n",
        ["[limits] operation_timeout = -5", "0 or greater (0 turns it off)"],
        id="negative-operation-timeout",
    ),
    pytest.param(
        LISTENER + UPSTREAM + '[limits]\noperation_timeout = "2m"\n',
        ["[limits] operation_timeout = '2m'", "expected a number of seconds"],
        id="string-operation-timeout",
    ),
    # enumerations
    pytest.param(
        LISTENER.replace('"none"', '"ssl"') + UPSTREAM,
        [
            "[[listener]] #1 tls = 'ssl'",
            "expected one of 'none', 'starttls-optional', 'starttls-required', 'ldaps'",
        ],
        id="bad-listener-tls",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[tls]\nmin_version = 1.2\n",
        ["[tls] min_version = 1.2", "expected one of '1.2', '1.3'"],
        id="min-version-as-number",
    ),
    # upstream URLs
    pytest.param(
        LISTENER + '[upstream]\nurls = ["http://dc1.example.com"]\n',
        [
            "[upstream] urls",
            "'http://dc1.example.com'",
            "expected an ldap:// (StartTLS) or ldaps://",
        ],
        id="http-url",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldapi://%2Frun%2Fslapd%2Fldapi"]\n',
        ["[upstream] urls", "'ldapi://%2Frun%2Fslapd%2Fldapi'", "expected an ldap://"],
        id="ldapi-url",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldaps://dc1", "dc2"]\n',
        ["[upstream] urls", "'dc2'", "expected an ldap:// (StartTLS) or ldaps:// URL"],
        id="bare-hostname",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldap://dc1/dc=example,dc=com"]\n',
        ["[upstream] urls", "'ldap://dc1/dc=example,dc=com'", "with no DN or options"],
        id="url-with-dn",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldap://dc1/??sub"]\n',
        ["[upstream] urls", "'ldap://dc1/??sub'", "with no DN or options"],
        id="url-with-options",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldaps://"]\n',
        ["[upstream] urls", "'ldaps://' has no host"],
        id="url-without-host",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldaps://dc1:99999"]\n',
        ["[upstream] urls", "'ldaps://dc1:99999' is not a valid URL"],
        id="url-port-out-of-range",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldaps://dc1:0"]\n',
        ["[upstream] urls", "'ldaps://dc1:0'"],
        id="url-port-zero",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = ["ldaps://admin:secret@dc1"]\n',
        ["[upstream] urls", "expected scheme://host[:port]"],
        id="url-with-userinfo",
    ),
    pytest.param(
        LISTENER + "[upstream]\nurls = []\n",
        ["[upstream] urls = []", "expected a non-empty list of ldap:// or ldaps:// URLs"],
        id="empty-urls",
    ),
    pytest.param(
        LISTENER + '[upstream]\nurls = "ldaps://dc1"\n',
        ["[upstream] urls = 'ldaps://dc1'", "expected a non-empty list"],
        id="urls-not-a-list",
    ),
    pytest.param(LISTENER, ["[upstream] urls is required"], id="missing-urls"),
    # listeners
    pytest.param(UPSTREAM, ["at least one [[listener]] is required"], id="missing-listener"),
    pytest.param(
        "listener = []\n" + UPSTREAM,
        ["at least one [[listener]] is required"],
        id="empty-listener-array",
    ),
    pytest.param(
        '[listener]\nendpoint = "tcp:389"\n' + UPSTREAM,
        ["listener must be an array of tables, written [[listener]]"],
        id="listener-table-not-array",
    ),
    pytest.param(
        '[[listener]]\ntls = "none"\n' + UPSTREAM,
        ["[[listener]] #1 endpoint is required"],
        id="missing-endpoint",
    ),
    pytest.param(
        LISTENER.replace("tcp:389", "tcp:notaport") + UPSTREAM,
        ["[[listener]] #1 endpoint = 'tcp:notaport'", "expected a Twisted server endpoint string"],
        id="endpoint-port-not-a-number",
    ),
    pytest.param(
        LISTENER.replace("tcp:389", "tcp:636:interface=::") + UPSTREAM,
        [
            "[[listener]] #1 endpoint = 'tcp:636:interface=::'",
            "expected a Twisted server endpoint string",
        ],
        id="endpoint-unescaped-ipv6",
    ),
    pytest.param(
        LISTENER.replace("tcp:389", "") + UPSTREAM,
        ["[[listener]] #1 endpoint = ''", "expected a non-empty string"],
        id="endpoint-empty",
    ),
    pytest.param(
        LISTENER.replace("tcp:389", "carrier-pigeon:1") + UPSTREAM,
        ["endpoint = 'carrier-pigeon:1'", "expected a Twisted server endpoint string"],
        id="endpoint-unknown-type",
    ),
    pytest.param(
        LISTENER
        + 'name = "ldap"\n'
        + LISTENER.replace("389", "390")
        + 'name = "ldap"\n'
        + UPSTREAM,
        ["[[listener]] name = 'ldap' is used more than once"],
        id="duplicate-listener-names",
    ),
    pytest.param(
        LISTENER + 'name = "listener1"\n' + LISTENER.replace("389", "390") + UPSTREAM,
        ["[[listener]] name = 'listener1' is used more than once"],
        id="explicit-name-clashes-with-default",
    ),
    # TLS material
    pytest.param(
        LISTENER.replace('"none"', '"starttls-required"') + UPSTREAM,
        [
            "[tls] certificate and private_key are required by listener 'listener0'",
            "(tls = 'starttls-required')",
        ],
        id="starttls-without-certificate",
    ),
    pytest.param(
        LISTENER
        + LISTENER.replace('"none"', '"ldaps"').replace("389", "636")
        + UPSTREAM
        + '[tls]\ncertificate = "/c.pem"\n',
        ["[tls] certificate and private_key are required by listener 'listener1'", "'ldaps'"],
        id="ldaps-without-key",
    ),
    pytest.param(
        LISTENER + UPSTREAM + 'client_certificate = "/cc.pem"\n',
        ["[upstream] client_certificate and client_key must be set together"],
        id="client-certificate-without-key",
    ),
    pytest.param(
        LISTENER + UPSTREAM + 'client_key = "/ck.pem"\n',
        ["[upstream] client_certificate and client_key must be set together"],
        id="client-key-without-certificate",
    ),
    # limits
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_pdu_bytes = 1023\n",
        ["[limits] max_pdu_bytes = 1023", "between 1024 and 2147483648"],
        id="max-pdu-too-small",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nmax_pdu_bytes = 2147483649\n",
        ["[limits] max_pdu_bytes = 2147483649", "between 1024 and 2147483648"],
        id="max-pdu-too-large",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\nidle_timeout = -1\n",
        ["[limits] idle_timeout = -1", "expected a number of seconds greater than 0"],
        id="negative-timeout",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "[limits]\ntls_handshake_timeout = 0\n",
        ["[limits] tls_handshake_timeout = 0", "greater than 0"],
        id="zero-timeout",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "connect_timeout = inf\n",
        ["[upstream] connect_timeout = inf", "greater than 0"],
        id="infinite-timeout",
    ),
    pytest.param(
        LISTENER + UPSTREAM + "connect_timeout = nan\n",
        ["[upstream] connect_timeout = nan", "greater than 0"],
        id="nan-timeout",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_invalid_config_error_names_file_key_value_and_expectation(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    """An invalid file raises one ConfigError line with the path and what is wrong."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message


def test_long_bad_values_are_shortened(tmp_path: Path) -> None:
    """A huge bad value is cut to a readable length in the error message."""
    text = LISTENER + UPSTREAM + f'[tls]\nmin_version = "{"9" * 500}"\n'
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    message = str(caught.value)
    assert "[tls] min_version = '999" in message
    assert "..." in message
    assert len(message) < 300


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A missing file is reported with its path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="no such configuration file") as caught:
        config.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    """A path that cannot be read (a directory) is reported with the OS reason."""
    with pytest.raises(ConfigError, match="cannot read") as caught:
        config.load(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path}: ")


def test_invalid_toml_is_named_with_its_position(tmp_path: Path) -> None:
    """A TOML syntax error names the file and where parsing failed."""
    path = write(tmp_path, LISTENER + "[upstream\nurls = 1\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 4" in message


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """Relative file names resolve against the configuration file's directory."""
    text = (
        '[[listener]]\nendpoint = "tcp:389"\n[tls]\ncertificate = "certs/proxy.pem"\n'
        'private_key = "/abs/proxy.key"\n[upstream]\nurls = ["ldaps://dc1"]\nca_file = "ca.pem"\n'
    )
    loaded = config.load(write(tmp_path, text))
    assert loaded.tls.certificate == tmp_path / "certs" / "proxy.pem"
    assert loaded.tls.private_key == Path("/abs/proxy.key")
    assert loaded.upstream.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize("endpoint", ["ssl:636:privateKey=k.pem", "tls:dc1:636", "SSL:636"])
def test_tls_endpoint_types_are_refused(tmp_path: Path, endpoint: str) -> None:
    """ssl:/tls: endpoints would bypass the proxy's TLS policy, so they are refused."""
    text = f"[[listener]]\nendpoint = '{endpoint}'\ntls = 'none'\n" + UPSTREAM
    with pytest.raises(ConfigError, match=r"endpoint = .*use a tcp: endpoint with tls = \"ldaps\""):
        config.load(write(tmp_path, text))


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ("min_idle = 5\nmax_size = 2", "[pool] min_idle = 5 is larger than max_size = 2"),
        ("min_idle = -1", "[pool] min_idle = -1: expected an integer from 0 to 100000"),
        ("max_size = 0", "[pool] max_size = 0: expected an integer from 1 to 100000"),
        ("max_size = true", "[pool] max_size = True: expected an integer"),
        ("acquire_timeout = 0", "[pool] acquire_timeout = 0: expected a number of seconds"),
        ("health_check_interval = 'often'", "[pool] health_check_interval = 'often'"),
        ("size = 3", "[pool] unknown key 'size'"),
    ],
)
def test_pool_errors_name_the_key(tmp_path: Path, pool: str, expected: str) -> None:
    """Bad [pool] values fail with the file, the key and the value named."""
    path = write(tmp_path, LISTENER + UPSTREAM + "[pool]\n" + pool + "\n")
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_unknown_strategy_is_refused(tmp_path: Path) -> None:
    """upstream.strategy accepts only failover and round-robin."""
    text = LISTENER + UPSTREAM + 'strategy = "random"\n'
    with pytest.raises(ConfigError, match=r"\[upstream\] strategy = 'random': expected one of"):
        config.load(write(tmp_path, text))
