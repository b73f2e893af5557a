"""The documentation and the example configuration agree with the code they describe."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from ldapproxy import config
from ldapproxy.session import SessionState
from ldapproxy.upstream import UpstreamState

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.rst"
ARCHITECTURE = DOCS / "architecture.rst"
EXAMPLE = ROOT / "deploy" / "ldapproxy.example.toml"

#: Keys the example deliberately sets to something other than their default: a listener
#: with TLS needs a certificate and key, and domain controllers usually need a private CA.
EXAMPLE_NOT_DEFAULT = frozenset(
    {"tls.certificate", "tls.private_key", "upstream.ca_file", "metrics.endpoint"}
)

#: The subsections README's "Known limits" must keep.
KNOWN_LIMITS = (
    "SASL security layers",
    "Kerberos and channel binding",
    "SASL EXTERNAL",
    "Not yet implemented",
)

_ADORNMENT = set("=-~^\"'`#*+:.")


class Title(NamedTuple):
    """One reStructuredText section title: its adornment character, text and line."""

    char: str
    text: str
    line: int


def titles(text: str) -> list[Title]:
    """The section titles of an rst document (underlined, optionally also overlined)."""
    lines = text.splitlines()
    found = []
    for index in range(1, len(lines)):
        underline, title = lines[index], lines[index - 1].strip()
        if (
            underline
            and len(set(underline)) == 1
            and underline[0] in _ADORNMENT
            and title
            and not set(title) <= _ADORNMENT
            and len(underline) >= len(title)
        ):
            found.append(Title(underline[0], title, index - 1))
    return found


def section_body(text: str, title: str) -> tuple[str, list[Title]]:
    """The text of the section called ``title``, and the titles nested inside it."""
    all_titles = titles(text)
    start = next(t for t in all_titles if t.text == title)
    following = all_titles[all_titles.index(start) + 1 :]
    end = next((t for t in following if t.char == start.char), None)
    nested = [t for t in following if end is None or t.line < end.line]
    lines = text.splitlines()[start.line + 2 : end.line if end else None]
    return "\n".join(lines), nested


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML rendering for {value!r}")


def documented_default(option: config.Option) -> str:
    """What the reference must give as ``:default:`` for ``option``."""
    if option.shown_default is not None:
        return option.shown_default
    if option.required:
        return "required"
    return toml_value(option.default)


class Entry(NamedTuple):
    """One key's entry in the configuration reference."""

    group: str | None
    defaults: list[str]


def reference_entries() -> dict[str, list[Entry]]:
    """Every ``section.key`` title in the reference, with its group and ``:default:`` lines."""
    text = REFERENCE.read_text()
    lines = text.splitlines()
    all_titles = titles(text)
    entries: dict[str, list[Entry]] = {}
    group: str | None = None
    for position, title in enumerate(all_titles):
        table = re.fullmatch(r"``\[\[?(\w+)\]\]?``", title.text)
        key = re.fullmatch(r"``(\w+\.\w+)``", title.text)
        if key is None:
            group = table.group(1) if table else None
            continue
        end = all_titles[position + 1].line if position + 1 < len(all_titles) else len(lines)
        defaults = [
            match.group(1)
            for line in lines[title.line + 2 : end]
            if (match := re.fullmatch(r":default: (.*)", line))
        ]
        entries.setdefault(key.group(1), []).append(Entry(group, defaults))
    return entries


def example() -> dict[str, Any]:
    """The example configuration, parsed."""
    with EXAMPLE.open("rb") as stream:
        return tomllib.load(stream)


@pytest.mark.parametrize("option", config.OPTIONS, ids=lambda option: option.dotted)
def test_reference_documents_option(option: config.Option) -> None:
    """The reference has one entry per option, in its section, with the TOML default."""
    entries = reference_entries().get(option.dotted)
    assert entries, f"docs/configuration.rst has no ``{option.dotted}`` title"
    assert len(entries) == 1, f"``{option.dotted}`` is documented {len(entries)} times"
    assert entries[0].group == option.section, f"``{option.dotted}`` is under {entries[0].group}"
    assert entries[0].defaults == [documented_default(option)]


def test_reference_says_which_keys_need_a_restart() -> None:
    """Each key's entry says whether a reload applies it (``:reload: yes``) or it takes a
    restart (``:reload: restart``), as the option table says."""
    text = REFERENCE.read_text()
    for option in config.OPTIONS:
        body = text.split(f"``{option.dotted}``\n", 1)[1].split("\n``", 1)[0]
        expected = "restart" if option.restart else "yes"
        assert f"\n:reload: {expected}\n" in body, option.dotted


def test_reference_documents_only_real_options() -> None:
    """Every ``section.key`` documented in the reference is an option the code reads."""
    known = {option.dotted for option in config.OPTIONS}
    assert set(reference_entries()) - known == set()


def test_reference_has_a_heading_for_every_section() -> None:
    """Each configuration section has its own group heading in the reference."""
    text = REFERENCE.read_text()
    headings = {title.text for title in titles(text)}
    for section in {option.section for option in config.OPTIONS}:
        table = f"``[[{section}]]``" if section == "listener" else f"``[{section}]``"
        assert table in headings


def test_rendered_defaults_read_back_as_the_defaults() -> None:
    """The TOML written for each default parses back to exactly that default."""
    for option in config.OPTIONS:
        if option.required or option.shown_default is not None:
            continue
        value = tomllib.loads(f"value = {toml_value(option.default)}")["value"]
        assert type(value) is type(option.default), option.dotted
        assert value == option.default, option.dotted


def test_example_has_every_key_in_its_section() -> None:
    """The example sets every option, listener keys in every ``[[listener]]`` table."""
    document = example()
    for option in config.OPTIONS:
        if option.section == "listener":
            for index, listener in enumerate(document["listener"]):
                assert option.key in listener, f"[[listener]] #{index + 1} lacks {option.key}"
        else:
            assert option.key in document[option.section], option.dotted


def test_example_shows_two_listeners() -> None:
    """The example listens with StartTLS on 389 and with LDAPS on 636."""
    listeners = [(lc["endpoint"], lc["tls"]) for lc in example()["listener"]]
    assert listeners == [("tcp:389", "starttls-optional"), ("tcp:636", "ldaps")]


def test_example_values_are_the_defaults() -> None:
    """Optional keys hold their default, except the few a working example must set."""
    document = example()
    differing = set()
    for option in config.OPTIONS:
        if option.required or option.shown_default is not None:
            continue
        section = option.section
        table = document["listener"][0] if section == "listener" else document[section]
        value = table[option.key]
        if type(value) is not type(option.default) or value != option.default:
            differing.add(option.dotted)
    assert differing == EXAMPLE_NOT_DEFAULT


def test_example_is_a_valid_configuration() -> None:
    """``ldapproxy.config.parse`` accepts the example as it stands."""
    loaded = config.parse(example(), EXAMPLE)
    assert [lc.tls for lc in loaded.listeners] == [
        config.ListenerTLS.STARTTLS_OPTIONAL,
        config.ListenerTLS.LDAPS,
    ]
    assert all(url.scheme == "ldaps" for url in loaded.upstream.urls)


def test_readme_quick_start_is_make_demo_and_make_test() -> None:
    """README's quick start gives ``make demo`` and ``make test`` as commands."""
    body, _ = section_body(README.read_text(), "Quick start")
    commands = [line.strip() for line in body.splitlines() if line.startswith("    make ")]
    assert commands[:2] == ["make demo", "make test"]
    assert "make lint" in README.read_text()


def test_readme_links_to_configuration_reference() -> None:
    """README links to docs/configuration.rst."""
    assert re.search(r"`[^`<]+<docs/configuration\.rst>`_", README.read_text())


def test_readme_relative_links_exist() -> None:
    """Every relative link in README points to a file in the repository."""
    targets = re.findall(r"`[^`<]*<([^>]+)>`_", README.read_text())
    relative = [target for target in targets if "://" not in target]
    assert relative
    for target in relative:
        assert (ROOT / target).is_file(), target


def test_readme_known_limits_sections() -> None:
    """README's known limits keep a subsection each for SASL layers, Kerberos, EXTERNAL, gaps."""
    text = README.read_text()
    _, nested = section_body(text, "Known limits")
    subsections = [title.text for title in nested]
    for name in KNOWN_LIMITS:
        assert name in subsections
        body, _ = section_body(text, name)
        assert body.strip(), f"README section {name!r} is empty"


def test_architecture_maps_every_module() -> None:
    """The module map in docs/architecture.rst names every module of the package."""
    text = ARCHITECTURE.read_text()
    for module in sorted((ROOT / "ldapproxy").glob("*.py")):
        assert f"``ldapproxy/{module.name}``" in text, module.name


def test_architecture_lists_state_values() -> None:
    """docs/architecture.rst lists every session and upstream state with its value."""
    text = ARCHITECTURE.read_text()
    for member in [*SessionState, *UpstreamState]:
        assert re.search(rf"``{member.name}``\s+``{member.value}``", text), member


def test_index_lists_every_page() -> None:
    """docs/index.rst's toctree lists exactly the other pages in docs/."""
    text = (DOCS / "index.rst").read_text()
    toctree = text.split(".. toctree::", 1)[1].splitlines()[1:]
    pages = {line.strip() for line in toctree if line.strip() and not line.strip().startswith(":")}
    assert pages == {page.stem for page in DOCS.glob("*.rst")} - {"index"}


# -- plugins ----------------------------------------------------------------------------------

PLUGINS_DOC = DOCS / "plugins.rst"
BUNDLED = ("allowlist", "audit", "bind_guard")


def plugin_entries() -> dict[str, list[str]]:
    """Every ``plugin.key`` title in docs/plugins.rst with its ``:default:`` lines."""
    text = PLUGINS_DOC.read_text()
    lines = text.splitlines()
    all_titles = titles(text)
    entries: dict[str, list[str]] = {}
    for position, title in enumerate(all_titles):
        key = re.fullmatch(r"``(\w+\.\w+)``", title.text)
        if key is None:
            continue
        end = all_titles[position + 1].line if position + 1 < len(all_titles) else len(lines)
        entries[key.group(1)] = [
            match.group(1)
            for line in lines[title.line + 2 : end]
            if (match := re.fullmatch(r":default: (.*)", line))
        ]
    return entries


def bundled_options() -> dict[str, str]:
    """``plugin.key`` -> documented default, for every key of every bundled plugin."""
    from ldapproxy.plugin_chain import resolve

    return {
        f"{name}.{key}": default
        for name in BUNDLED
        for key, default in resolve(name).options.items()
    }


def example_plugins() -> dict[str, dict[str, Any]]:
    """The example's ``[[plugin]]`` tables by ``use``."""
    return {table["use"]: table for table in example().get("plugin", [])}


def test_plugins_doc_documents_every_bundled_plugin_key() -> None:
    """docs/plugins.rst has one entry per bundled plugin key with its default, and no
    entry for a key that does not exist."""
    entries = plugin_entries()
    options = bundled_options()
    for dotted, default in options.items():
        assert entries.get(dotted) == [default], dotted
    assert set(entries) == set(options)


def test_example_loads_every_bundled_plugin_with_every_key() -> None:
    """The example configuration has a [[plugin]] table for each bundled plugin, with
    every key, at its default unless the default is ``required``; the tables validate."""
    from ldapproxy import testing
    from ldapproxy.plugin_chain import load_plugins, resolve

    tables = example_plugins()
    assert set(tables) == set(BUNDLED)
    for name in BUNDLED:
        cls = resolve(name)
        table = {k: v for k, v in tables[name].items() if k != "use"}
        assert set(table) == set(cls.options), name
        for key, default in cls.options.items():
            if default != "required":
                assert toml_value(table[key]) == default, f"{name}.{key}"
    loaded = config.parse(example(), EXAMPLE)
    plugins = load_plugins(loaded.plugins, testing.context(listeners=("ldap", "ldaps")))
    assert [plugin.name for plugin in plugins] == [t for t in tables]


@pytest.mark.parametrize("name", BUNDLED)
def test_plugin_reads_exactly_its_documented_keys(name: str) -> None:
    """Each bundled plugin reads every key it declares in ``options`` and no other."""
    from ldapproxy import testing
    from ldapproxy.plugin_chain import resolve

    cls = resolve(name)
    table = {k: v for k, v in example_plugins()[name].items() if k != "use"}
    options = testing.options(table)
    cls.from_config(options, testing.context())
    assert options._read == set(cls.options)


def test_index_and_readme_point_to_plugins_doc() -> None:
    """The plugin guide is reachable from the README."""
    assert "docs/plugins.rst" in README.read_text()


# -- security ---------------------------------------------------------------------------------


def test_security_doc_names_only_tests_that_exist() -> None:
    """Every test file docs/security.rst offers as evidence is in the suite."""
    text = (DOCS / "security.rst").read_text()
    named = set(re.findall(r"``(tests/[\w/]+\.py)``", text))
    assert len(named) >= 15, named
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert missing == [], missing


def test_readme_and_index_point_to_the_security_doc() -> None:
    assert "docs/security.rst" in (ROOT / "README.rst").read_text()
