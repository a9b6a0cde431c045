"""Untrusted templates (say, from a downloaded GGUF) cannot reach Python: the usual Jinja SSTI
payloads all fail with a TemplateError and run nothing."""

from __future__ import annotations

import json

import pytest

from r7b.errors import R7BError
from r7b.runtime.prompt import TemplateError, render_template_source

# `{S}` is replaced by a sentinel path that a successful payload would create.
PAYLOADS = {
    "str_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "tuple_base_subclasses": "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "cycler_globals_popen": "{{ cycler.__init__.__globals__.os.popen('touch {S}').read() }}",
    "joiner_globals_popen": "{{ joiner.__init__.__globals__.os.popen('touch {S}').read() }}",
    "namespace_globals_popen": "{{ namespace.__init__.__globals__.os.popen('touch {S}').read() }}",
    "lipsum_globals_os": "{{ lipsum.__globals__['os'].popen('touch {S}').read() }}",
    "lipsum_attr_filter": "{{ lipsum|attr('__globals__') }}",
    "self_context": "{{ self._TemplateReference__context }}",
    "self_init_globals": "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('touch {S}') }}",
    "config_items": "{{ config.items() }}",
    "config_class_init": "{{ config.__class__.__init__.__globals__['os'].popen('touch {S}') }}",
    "request_application": "{{ request.application.__globals__.__builtins__.__import__('os').popen('touch {S}') }}",
    "attr_hex_escape": "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f')|attr('\\x5f\\x5fmro\\x5f\\x5f') }}",
    "subscript_hex_escape": "{{ ''['\\x5f\\x5fclass\\x5f\\x5f']['\\x5f\\x5fbase\\x5f\\x5f'] }}",
    "subscript_joined_name": "{{ ()[('_' * 2) ~ 'class' ~ ('_' * 2)] }}",
    "raise_exception_builtins":
        "{{ raise_exception.__globals__['__builtins__']['__import__']('os').popen('touch {S}') }}",
    "strftime_globals": "{{ strftime_now.__globals__ }}",
    "range_self": "{{ range.__self__ }}",
    "dict_type": "{{ dict.__class__.__base__.__subclasses__() }}",
    "set_chain": "{% set a = ''.__class__ %}{% set b = a.__base__ %}{{ b.__subclasses__() }}",
    "namespace_dunder_store": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "namespace_private_init": "{% set ns = namespace(_secret=1) %}{{ ns }}",
    "format_attribute": "{{ '{0.__class__.__base__.__subclasses__}'.format('') }}",
    "format_map_attribute": "{{ '{x.__class__}'.format_map({'x': ''}) }}",
    "format_via_attr_filter": "{{ '{0.__class__}'|attr('format')(1) }}",
    "percent_format_of_class": "{{ '%s' % messages.__class__ }}",
    "map_attribute": "{{ messages|map(attribute='__class__')|list }}",
    "selectattr": "{{ messages|selectattr('__class__')|list }}",
    "sort_attribute": "{{ messages|sort(attribute='__class__') }}",
    "groupby": "{{ messages|groupby('__class__') }}",
    "list_mutation": "{{ messages.append(1) }}",
    "dict_mutation": "{{ messages[0].update(role='system') }}",
    "loop_internals": "{% for m in messages %}{{ loop.__class__ }}{% endfor %}",
    "macro_globals": "{% macro m() %}{% endmacro %}{{ m.__init__.__globals__ }}",
    "include_file": "{% include '/etc/passwd' %}",
    "import_module": "{% import 'os' as os %}{{ os.popen('touch {S}') }}",
    "extends_file": "{% extends '/etc/passwd' %}",
    "huge_string": "{{ 'x' * 100000000 }}",
    "huge_power": "{{ 9 ** 999999 }}",
    "huge_range": "{{ range(1000000000)|length }}",
    "unbounded_recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "cpu_spin": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "string_doubling": "{% set ns = namespace(s='x' * 1000000) %}"
                       "{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "list_doubling": "{% set ns = namespace(l=[0] * 100000) %}"
                     "{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
}


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_payload_fails_and_runs_nothing(tmp_path, payload):
    sentinel = tmp_path / "pwned"
    with pytest.raises(TemplateError) as info:
        render_template_source(payload.replace("{S}", str(sentinel)), messages=[{"role": "user", "content": "hi"}])
    assert isinstance(info.value, R7BError) and isinstance(info.value, ValueError)
    assert str(info.value).strip() and "\n" not in str(info.value)
    assert not sentinel.exists()


def test_corpus_size(security_tally):
    assert len(PAYLOADS) >= 20
    security_tally("template sandbox", f"{len(PAYLOADS)} injection payloads, each refused with a TemplateError")


@pytest.mark.parametrize("payload, limit", [("cpu_spin", "ran for more than"), ("string_doubling", "MiB of memory"),
                                            ("list_doubling", "MiB of memory")])
def test_limits_stop_runaway_templates(payload, limit):
    with pytest.raises(TemplateError, match=limit):
        render_template_source(PAYLOADS[payload], messages=[])


def test_limits_are_lifted_afterwards():
    """The trace function is removed again, whatever the template did."""
    import sys

    before = sys.gettrace()
    with pytest.raises(TemplateError):
        render_template_source(PAYLOADS["cpu_spin"], seconds=0.05)
    assert sys.gettrace() is before
    assert render_template_source("{{ 1 + 1 }}", seconds=None) == "2"


def test_unused_jinja_globals_are_gone():
    assert render_template_source("{{ cycler is defined }} {{ joiner is defined }} {{ lipsum is defined }}") \
        == "False False False"


def test_what_chat_templates_use_still_works():
    source = ("{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}|{{ range(3)|list }}|"
              "{{ dict(a=1)|tojson }}|{{ m['_id'] }}|{{ m.role|upper }}|{{ 'ab' * 2 }}|{{ 2 ** 10 }}|"
              "{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}|"
              "{{ '{}-{}'.format(1, 2) }}|{{ strftime_now('%Y') | length }}")
    expected = '2|[0, 1, 2]|{"a": 1}|7|USER|abab|1024|1|1-2|4'
    assert render_template_source(source, m={"_id": 7, "role": "user"}) == expected


@pytest.mark.parametrize("value, args, expected", [
    ({"b": "é", "a": [1, None]}, "", '{"b": "é", "a": [1, null]}'),
    ({"b": 1, "a": 2}, "sort_keys=true", '{"a": 2, "b": 1}'),
    ([1, {"a": "<&>"}], "indent=2", '[\n  1,\n  {\n    "a": "<&>"\n  }\n]'),
    ({"a": 1}, "separators=(',', ':')", '{"a":1}'),
    ("é", "ensure_ascii=true", '"\\u00e9"'),
])
def test_tojson_is_plain_json_dumps(value, args, expected):
    rendered = render_template_source(f"{{{{ value|tojson({args}) }}}}", value=value)
    assert rendered == expected
    assert rendered == json.dumps(value, ensure_ascii="ensure_ascii" in args, sort_keys="sort_keys" in args,
                                  indent=2 if "indent" in args else None,
                                  separators=(",", ":") if "separators" in args else None)


def test_raise_exception_is_a_template_error():
    with pytest.raises(TemplateError, match="custom failure"):
        render_template_source("{{ raise_exception('custom failure') }}")


@pytest.mark.parametrize("source", ["{% if %}", "{{ messages[0 }}", "{% endfor %}"])
def test_syntax_errors(source):
    with pytest.raises(TemplateError, match="syntax error"):
        render_template_source(source, messages=[])


def test_variables_are_copied_to_plain_data(tmp_path):
    """Objects with methods never reach the template (a Path could write files)."""
    with pytest.raises(TemplateError, match="only JSON values"):
        render_template_source("{{ p.write_text('x') }}", p=tmp_path / "written")
    assert not (tmp_path / "written").exists()


def test_non_string_source():
    with pytest.raises(TemplateError):
        render_template_source(b"{{ 1 }}")  # type: ignore[arg-type]
