"""One-call template bombs: a single builtin call that builds gigabytes or runs for minutes.

The sandbox checks its limits between template lines, so these run past them in-process. Rendered
from a file (`render_template_source`, `Model.load(..., chat_template="gguf")`), they run in the
template worker (runtime/template_worker.py) under OS limits. For each bomb, and for the 44
injection payloads of test_template_sandbox.py: a one-line TemplateError, this process's resident
memory never more than 64 MiB above where it started, no render more than 1 s past its limit, a
timer thread here that keeps ticking, and a normal render that works right after.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import gguf
import pytest

from r7b.errors import R7BError
from r7b.runtime.sandbox import UNTRUSTED_SECONDS, TemplateError
from r7b.runtime.prompt import render_template_source
from r7b.runtime.template_worker import MAX_REPLY_BYTES, TemplateWorker, shared_worker
from test_template_sandbox import PAYLOADS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the figures read /proc (Linux)")

G, M = "1500000000", "1000000"  # 1.5 G (bytes, items or digits) and 1 M
BOMBS = {
    # padding and formatting: one call, gigabytes
    "center_filter": "{{ 'x'|center(G) }}",
    "center_method": "{{ 'x'.center(G) }}",
    "ljust_method": "{{ 'x'.ljust(G, 'y') }}",
    "rjust_method": "{{ 'x'.rjust(G) }}",
    "zfill": "{{ '1'.zfill(G) }}",
    "expandtabs": "{{ '\\t\\t'.expandtabs(G) }}",
    "format_width": "{{ '%Gs'|format('x') }}",
    "format_star_width": "{{ '%*s'|format(G, 'x') }}",
    "format_zero_pad": "{{ '%0Gd'|format(7) }}",
    "format_precision": "{{ '%.Gf'|format(1.5) }}",
    "percent_operator": "{{ '%Gs' % 'x' }}",
    "str_format_width": "{{ '{:>G}'.format('x') }}",
    "str_format_nested_spec": "{{ '{0:{1}}'.format('x', G) }}",
    "format_nested": "{{ '%300000000s'|format('%300000000s'|format('x')) }}",
    "center_nested": "{{ 'x'|center(100000000)|center(200000000)|center(400000000) }}",
    "indent_width": "{{ 'a\\nb'|indent(G) }}",
    "indent_lines": "{{ ('x\\n' * M)|indent(1000) }}",
    "wordwrap_wrapstring": "{{ ('x ' * 1000)|wordwrap(1, wrapstring='y' * M) }}",
    "truncate_end": "{{ (['x' * M] * 1000)|map('truncate', 10, false, 'y' * M)|join }}",
    # growing by replacement and joining
    "replace_filter": "{{ ('x' * 1000)|replace('x', 'y' * M) }}",
    "replace_empty": "{{ ('x' * 1000)|replace('', 'y' * M) }}",
    "replace_method": "{{ ('x' * 1000).replace('x', 'y' * M) }}",
    "join_filter": "{{ (['x' * M] * 1500)|join }}",
    "join_separator": "{{ ('x' * M).join(['y'] * 1500) }}",
    "join_huge_list_separator": "{{ range(100000)|map('string')|join('y' * M) }}",
    "join_map_upper": "{{ (['x' * M] * 1500)|map('upper')|join }}",
    "escape_joined": "{{ (['<' * M] * 100)|join|escape }}",
    "urlencode_joined": "{{ (['é' * M] * 100)|join|urlencode }}",
    # serializing
    "tojson_large": "{{ (['x' * M] * 1500)|tojson }}",
    "tojson_indent": "{{ [[[[1]]]]|tojson(indent=G) }}",
    "string_of_list": "{{ (['x' * M] * 1500)|string }}",
    "pprint_list": "{{ (['x' * M] * 1500)|pprint }}",
    "xmlattr": "{{ dict.fromkeys(range(1500)|map('string'), 'x' * M)|xmlattr }}",
    # lists, dicts, numbers, bytes
    "batch_fill": "{{ [0]|batch(G, 'x')|list|length }}",
    "slice_many": "{{ [0]|slice(G)|list|length }}",
    "sum_lists": "{{ ([range(100000)|list] * 1000)|sum(start=[])|length }}",
    "dict_from_generator": "{{ dict.fromkeys(range(100000)|map('string')|map('center', 10000))|length }}",
    "range_huge": "{{ range(G)|list|length }}",
    "power_tower": "{{ ((10 ** 1000) ** 1000) ** 1000 }}",
    "bytes_repeat": "{{ ('x'.encode() * G)|length }}",
    "bytes_encode_repeat": "{{ (('x' * M).encode('utf-32') * 1000)|length }}",
    # deep values and big answers
    "tojson_deep": "{% set ns = namespace(v=[]) %}{% for i in range(100000) %}{% set ns.v = [ns.v] %}{% endfor %}"
                   "{{ ns.v|tojson }}",
    "answer_200MB": "{{ 'x'|center(200000000) }}",
    "answer_40MB_loop": "{% for i in range(40) %}{{ 'x' * M }}{% endfor %}",
}
BOMBS = {name: source.replace("G", G).replace("M", M) for name, source in BOMBS.items()}
CORPUS = {**{f"bomb:{k}": v for k, v in BOMBS.items()}, **{f"payload:{k}": v for k, v in PAYLOADS.items()}}
MESSAGES = [{"role": "user", "content": "hi"}]
RSS_RISE = 64 * 1024**2
OVERRUN = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class _Watch:
    """A thread here that ticks every 10 ms, noting the longest gap and this process's peak RSS."""

    def __init__(self) -> None:
        self.base = _rss()
        self.peak = self.base
        self.gap = 0.0
        self.elapsed: dict[str, float] = {}
        self.overrun = 0.0  # the most a render ran past its limit (time-limited ones)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.01):
            now = time.monotonic()
            self.gap = max(self.gap, now - last)
            last = now
            self.peak = max(self.peak, _rss())

    def rise(self) -> int:
        self.peak = max(self.peak, _rss())
        return self.peak - self.base

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def watch():
    assert render_template_source("{{ 1 + 1 }}", messages=MESSAGES) == "2"  # the shared worker is up
    w = _Watch()
    yield w
    w.stop()


@pytest.mark.parametrize("name", CORPUS)
def test_bomb_is_stopped_and_the_next_render_works(name, watch, tmp_path):
    sentinel = tmp_path / "pwned"
    source = CORPUS[name].replace("{S}", str(sentinel))
    start = time.monotonic()
    with pytest.raises(TemplateError) as info:
        render_template_source(source, messages=MESSAGES)
    elapsed = time.monotonic() - start
    watch.elapsed[name] = elapsed
    if "ran for more than" in str(info.value):
        watch.overrun = max(watch.overrun, elapsed - UNTRUSTED_SECONDS)
    message = str(info.value)
    assert message.strip() and "\n" not in message and isinstance(info.value, R7BError)
    assert elapsed <= UNTRUSTED_SECONDS + OVERRUN, f"{name} ran {elapsed:.2f} s: {message}"
    assert not sentinel.exists()
    assert render_template_source("{{ messages[0].content }}", messages=MESSAGES) == "hi"
    assert watch.rise() <= RSS_RISE, f"{name}: this process grew by {watch.rise() >> 20} MiB"
    assert watch.gap < 1.0, f"{name}: the timer thread stalled for {watch.gap:.2f} s"


def test_the_worker_is_locked_down():
    """Linux: no file or socket can be opened and 1 GiB cannot be allocated inside the worker."""
    with TemplateWorker() as worker:
        assert worker.render("{{ 1 + 1 }}", "t", {}) == "2"
        checks = worker.probe()["checks"]
        limits = dict(worker.limits)
    for check in ("open_file", "create_file", "socket", "allocate_1GiB"):
        assert checks[check].startswith("refused"), (check, checks[check])
    assert limits["RLIMIT_FSIZE"] == 0 and limits["RLIMIT_NOFILE"] <= 8
    assert isinstance(limits["RLIMIT_AS"], int) and isinstance(limits["RLIMIT_CPU"], int)


def test_render_latency_in_the_worker(security_tally, watch):
    """A reused worker renders a real template in about a millisecond (round trip included)."""
    from r7b.runtime.model import _SAMPLES
    from r7b.runtime.prompt import render_prompt
    from r7b.templates import TEMPLATE_NAMES, template_source

    sources = {name: template_source(name) for name in TEMPLATE_NAMES}
    worker = shared_worker()
    messages, tools, documents = _SAMPLES["tool_use"]
    expected = render_prompt(messages, tools, documents, template="tool_use")  # in-process, trusted
    times = []
    for _ in range(50):
        start = time.perf_counter()
        text = render_prompt(messages, tools, documents, template="tool_use", sources=sources, worker=worker)
        times.append(time.perf_counter() - start)
        assert text == expected
    times.sort()
    median, p95 = times[len(times) // 2], times[int(len(times) * 0.95)]
    assert median < 0.05
    limited = [n for n in watch.elapsed if n in CORPUS]
    security_tally("template bombs", f"{len(BOMBS)} bombs (one-call, alone and nested; deep values; big answers) "
                                     f"+ {len(PAYLOADS)} payloads rendered in the "
                                     f"template worker: all refused in one line; this process grew at most "
                                     f"{watch.rise() / 2**20:.1f} MiB (limit {RSS_RISE >> 20}), the slowest took "
                                     f"{max(watch.elapsed.values(), default=0):.2f} s (limit {UNTRUSTED_SECONDS:g} s, "
                                     f"overrun at most {watch.overrun:.2f} s), timer gap at most {watch.gap:.2f} s "
                                     f"({len(limited)} renders); worker render of tool_use: median "
                                     f"{median * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms")


def test_a_worker_killed_from_outside_is_replaced():
    with TemplateWorker() as worker:
        assert worker.render("{{ 1 }}", "t", {}) == "1"
        os.kill(worker.pid, 9)
        time.sleep(0.1)
        assert worker.render("{{ 2 }}", "t", {}) == "2"
    with pytest.raises(TemplateError, match="closed"):
        worker.render("{{ 3 }}", "t", {})


def test_a_worker_near_its_cpu_limit_is_replaced(monkeypatch):
    from r7b.runtime import template_worker

    monkeypatch.setattr(template_worker, "CPU_SECONDS", 0)  # the parent's view: every worker has used half
    with TemplateWorker() as worker:
        assert worker.render("{{ 1 }}", "t", {}) == "1" and worker.pid is None  # recycled after answering
        assert worker.render("{{ 2 }}", "t", {}) == "2" and worker.restarts == 0


def test_a_worker_outlives_no_parent():
    """A parent that dies without closing its worker: the worker sees its pipe close and exits."""
    import subprocess

    code = ("import os, sys; from r7b.runtime.template_worker import TemplateWorker; w = TemplateWorker(); "
            "w.render('{{ 1 }}', 't', {}); print(w.pid, flush=True); os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(proc.stdout.strip())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # exited, not yet reaped
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.05)
    pytest.fail(f"worker {pid} still running after its parent exited")


def test_any_text_survives_the_round_trip():
    text = "é ü 中文 \U0001F600 \ud800 <|END_OF_TURN_TOKEN|> \x00 \n"  # a lone surrogate too
    assert render_template_source("{{ s }}|{{ n }}", s=text, n=1.5) == f"{text}|1.5"


def test_answers_over_the_cap_are_refused():
    with TemplateWorker() as worker:
        with pytest.raises(TemplateError, match=f"more than {MAX_REPLY_BYTES >> 20} MiB"):
            worker.render("{{ 'x' * 1000000 }}" * 20, "t", {})
        assert worker.restarts == 1 and worker.render("{{ 'ok' }}", "t", {}) == "ok"


# -- through a model file ------------------------------------------------------------------

CUSTOM = ("{{ bos_token }}{% for m in messages %}{% if 'BOOM' in m.content %}BOMB{% endif %}"
          "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ m.content }}<|END_OF_TURN_TOKEN|>{% endfor %}"
          "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")


# On the message's text, so that Jinja cannot fold them into constants when it compiles the template
# (a constant bomb is refused at load, in the worker, which is fine but not what is tested here).
MODEL_BOMBS = {"memory": "{{ m.content|center(1500000000) }}",
               "time": "{{ (((m.content|length) * 10 ** 1000) ** 1000) ** 1000 }}",
               "answer": "{{ m.content|center(200000000) }}"}


@pytest.mark.parametrize("bomb", MODEL_BOMBS)
def test_a_model_file_bomb_kills_only_its_worker(stand_in_gguf, edited_gguf, bomb):
    """A template that passes the check at load and explodes on one request: that request gets one
    line naming the file and the template; the model's worker is replaced; the next request works;
    closing the model ends the worker."""
    source = CUSTOM.replace("BOMB", MODEL_BOMBS[bomb])
    path = edited_gguf(stand_in_gguf("f16"), {"tokenizer.chat_template": (source, gguf.GGUFValueType.STRING)},
                       f"bomb-{bomb}.gguf")
    from r7b.runtime.model import Model

    model = Model.load(path, n_ctx=512, n_threads=1, chat_template="gguf")
    try:
        worker = model.template_worker
        first = worker.pid
        assert first is not None and first != shared_worker().pid
        before, start = _rss(), time.monotonic()
        with pytest.raises(R7BError) as info:
            model.render([{"role": "user", "content": "BOOM"}])
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert str(path) in message and "'default'" in message and "\n" not in message
        assert elapsed <= UNTRUSTED_SECONDS + OVERRUN and _rss() - before <= RSS_RISE
        assert "Hello" in model.render([{"role": "user", "content": "Hello"}])
        assert worker.pid not in (None, first) and worker.restarts == 1
        last = worker.pid
    finally:
        model.close()
    assert worker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(last, 0)
