"""Renders chat messages to a prompt with the model's own Jinja chat template.

Templates come from the GGUF (`tokenizer.chat_template`), i.e. from files we
did not write. They run in Jinja's immutable sandbox, which stops them from
reaching Python internals but not from spending unbounded time or memory, so
rendering is bounded as well (`RenderLimits`):

- every loop iteration, call, filter and output chunk checks a wall-clock
  deadline;
- loops share a per-render iteration budget;
- operators, methods and filters that can multiply sizes (`*`, `**`, `%`,
  `+`, `~`, `center`, `indent`, `join`, `replace`, `format`, widths in format
  specs, ...) refuse results over a size limit before building them, and every
  value they build counts against a per-render allocation budget;
- output is consumed chunk by chunk with a cap on its total size.

A template over any bound raises TemplateError; the decode thread that
rendered it carries on.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import FILTERS
from jinja2.runtime import LoopContext
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, pass_environment
from markupsafe import Markup

from engine.errors import PeregrineError

# Used when a GGUF carries no template: ChatML is what most instruct models expect.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Private-use code points frame placeholders for message contents.
_MARK = re.compile("(\ue000[0-9]+\ue001)")

# Longest error text taken from a template (raise_exception, jinja messages).
_MAX_MESSAGE = 300


class TemplateError(PeregrineError):
    """The chat template could not render these messages."""

    def __init__(self, message: str) -> None:
        # One line of bounded length, whatever the template put in it.
        text = " ".join(message.split())
        super().__init__(text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…")


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render of a chat template (sizes in characters or list items).

    The size bounds grow with the messages themselves (`input_factor` times
    their total text), so a long but honest chat always renders; the
    scheduler then decides whether it fits the context.
    """

    seconds: float = 2.0
    max_output: int = 8 << 20
    max_value: int = 4 << 20  # largest single string or list built by an operation
    max_allocated: int = 64 << 20  # everything built by bounded operations, together
    max_iterations: int = 1_000_000  # loop iterations, all loops together
    max_int_bits: int = 1 << 16
    max_source: int = 256 << 10  # template text; real ones are under 50 KB
    max_nesting: int = 100  # syntax-tree depth; real templates stay under 20
    input_factor: int = 8


class _LimitExceeded(TemplateError):
    """A render went over one of its RenderLimits."""


_WHY = {
    "time": "took too long to render (over {limit:g} s)",
    "output": "produced too much output (over {limit:,} characters)",
    "value": "built a value too large ({size:,} items or characters, limit {limit:,})",
    "allocated": "built too much data (over {limit:,} characters in all)",
    "iterations": "ran too many loop iterations (over {limit:,})",
    "int": "built a number too large (over {limit:,} bits)",
}


class _Budget:
    """What one render may still spend; shared by every hook during that render."""

    def __init__(self, limits: RenderLimits, clock: Callable[[], float], input_size: int) -> None:
        self.clock = clock
        self.seconds = limits.seconds
        self.deadline = clock() + limits.seconds
        extra = limits.input_factor * input_size
        self.max_output = limits.max_output + extra
        self.max_value = limits.max_value + extra
        self.max_allocated = limits.max_allocated + 4 * extra
        self.max_iterations = limits.max_iterations + input_size
        self.max_int_bits = limits.max_int_bits
        self.iterations = 0
        self.allocated = 0

    def fail(self, what: str, size: int = 0) -> _LimitExceeded:
        limit: float = {
            "time": self.seconds,
            "output": self.max_output,
            "value": self.max_value,
            "allocated": self.max_allocated,
            "iterations": self.max_iterations,
            "int": self.max_int_bits,
        }[what]
        return _LimitExceeded(
            "the model's chat template " + _WHY[what].format(limit=limit, size=size)
        )

    def tick(self) -> None:
        """Checks the deadline (loops, calls, filters and output chunks call this)."""
        if self.clock() > self.deadline:
            raise self.fail("time")

    def iterate(self) -> None:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise self.fail("iterations")
        self.tick()

    def check_size(self, size: int) -> None:
        """Refuses to build a value of `size` items or characters."""
        if size > self.max_value:
            raise self.fail("value", size)

    def built(self, value: object) -> None:
        """Counts a value an operation just built against the allocation budget."""
        if isinstance(value, str | list | tuple | dict):
            size = len(value)
            self.check_size(size)
            self.allocated += size
            if self.allocated > self.max_allocated:
                raise self.fail("allocated")
        elif isinstance(value, int) and value.bit_length() > self.max_int_bits:
            raise self.fail("int")

    def check_number(self, value: object) -> None:
        """Refuses a width, count or precision that would build a value over the limit."""
        if isinstance(value, int) and value > self.max_value:
            raise self.fail("value", value)

    def check_text(self, value: object) -> None:
        """Refuses to turn `value` into text when that text would be over the limit."""
        if not isinstance(value, str | int | float | bool | type(None)):
            size = _text_weight(value, self.max_value)
            if size > self.max_value:
                raise self.fail("value", size)


def _text_weight(value: object, limit: int) -> int:
    """About how long str(value) is; stops counting once past `limit`.

    A list of a million references to one big string is small in memory but
    huge as text, so containers are walked, not measured.
    """
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, Namespace):
            total += 12
            stack.append(item._Namespace__attrs)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            total += 16
    return total


def _input_size(value: object, depth: int = 0) -> int:
    """Total text in the messages and tools (they scale the size limits)."""
    if isinstance(value, str):
        return len(value)
    if depth > 32:
        return 0
    if isinstance(value, dict):
        return sum(_input_size(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_input_size(v, depth + 1) for v in value)
    return 0


# A %-format conversion: (key)flags width .precision length type.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_DIGITS = re.compile(r"\d+")


def _check_percent_format(fmt: str, args: object, budget: _Budget) -> None:
    """Refuses "%999999999d"-style widths (and "*" widths, which no template needs)."""
    for match in _PERCENT_SPEC.finditer(fmt):
        width, precision, _ = match.groups()
        for number in (width, precision):
            if number == "*":
                raise TemplateError("the model's chat template uses a '*' width in a % format")
            if number is not None:
                budget.check_number(int(number))
    budget.check_text(args)


def _check_format_spec(spec: str, budget: _Budget) -> None:
    for number in _DIGITS.findall(spec):
        if len(number) > 12:
            raise budget.fail("value", 10**12)
        budget.check_number(int(number))


class _BoundedFormatter(SandboxedFormatter):
    """str.format for templates, with field widths and converted values bounded."""

    def __init__(self, env: BoundedSandbox, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._bounded_env = env

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = self._bounded_env.budget()
        _check_format_spec(format_spec, budget)
        budget.check_text(value)
        return super().format_field(value, format_spec)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        self._bounded_env.budget().check_text(value)
        return super().convert_field(value, conversion)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """The escaping variant, for format strings that are Markup."""


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `~` to a size-checked join instead of a plain one."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # Same choice of join function as Jinja's own visit_Concat.
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.bounded_concat({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    @optimizeconst
    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        # A slice is a copy: route it through the environment so that it is counted.
        self.write("environment.bounded_slice(")
        self.visit(node.node, frame)
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            self.write(", ")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write(")")


class _CountedLoop:
    """A loop's iterable that spends the render's iteration budget item by item."""

    __slots__ = ("_env", "_items")

    def __init__(self, items: Iterable[Any], env: BoundedSandbox) -> None:
        self._items = items
        self._env = env

    def __len__(self) -> int:
        # TypeError for unsized iterables: LoopContext then counts them itself.
        return len(self._items)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        budget = self._env.budget()
        for item in self._items:
            budget.iterate()
            yield item


# Filters that turn their first argument into text (a container becomes its repr).
_STRINGIFYING_FILTERS = frozenset(
    [
        "capitalize",
        "center",
        "e",
        "escape",
        "forceescape",
        "format",
        "indent",
        "lower",
        "pprint",
        "replace",
        "safe",
        "string",
        "striptags",
        "title",
        "tojson",
        "trim",
        "truncate",
        "upper",
        "urlencode",
        "urlize",
        "wordcount",
        "wordwrap",
        "xmlattr",
    ]
)


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every way to spend time or memory bounded.

    The limits of the render in progress live in a thread-local `_Budget`
    (`render_budget`); outside a render a fresh budget applies, so Jinja's
    compile-time constant folding is bounded too.
    """

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(
        self,
        *,
        limits: RenderLimits,
        clock: Callable[[], float],
        **options: Any,
    ) -> None:
        super().__init__(finalize=self._finalize, **options)
        self.limits = limits
        self.clock = clock
        self._local = threading.local()
        # lipsum builds text from nothing; templates have no use for it.
        self.globals.pop("lipsum", None)
        self.filters = {name: self._bounded_filter(name, f) for name, f in FILTERS.items()}
        self.filters["sum"] = self._bounded_filter("sum", _bounded_sum)
        self.filters["tojson"] = self._bounded_filter("tojson", _tojson)
        self.concat = self._bounded_concat_list  # type: ignore[method-assign]

    # --- budget -------------------------------------------------------------------

    def budget(self) -> _Budget:
        budget: _Budget | None = getattr(self._local, "budget", None)
        return budget if budget is not None else _Budget(self.limits, self.clock, 0)

    def render_budget(self, input_size: int) -> _Budget:
        """Starts a render's budget on this thread (end it with `end_render`)."""
        budget = _Budget(self.limits, self.clock, input_size)
        self._local.budget = budget
        return budget

    def end_render(self) -> None:
        self._local.budget = None

    # --- parsing ------------------------------------------------------------------

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        self._check_nesting(tree)
        for loop in tree.find_all(nodes.For):
            # Every loop draws on the iteration budget and checks the deadline.
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("bounded_loop"),
                [loop.iter],
                [],
                None,
                None,
                lineno=loop.lineno,
            )
        return tree

    def _check_nesting(self, tree: nodes.Node) -> None:
        stack: list[tuple[nodes.Node, int]] = [(tree, 0)]
        while stack:
            node, depth = stack.pop()
            if depth > self.limits.max_nesting:
                raise TemplateError(
                    "the model's chat template is nested too deeply "
                    f"(over {self.limits.max_nesting} levels)"
                )
            stack.extend((child, depth + 1) for child in node.iter_child_nodes())

    # --- hooks called from compiled templates -------------------------------------

    def bounded_loop(self, items: Iterable[Any]) -> _CountedLoop:
        return _CountedLoop(items, self)

    def bounded_concat(self, join: Callable[[Any], str], items: tuple[Any, ...]) -> str:
        budget = self.budget()
        size = 0
        for item in items:
            if isinstance(item, str):
                size += len(item)
            else:
                budget.check_text(item)
        budget.check_size(size)
        result = join(items)
        budget.built(result)
        return result

    def _bounded_concat_list(self, pieces: Iterable[str]) -> str:
        # Macro bodies and {% set %} blocks: joined output captured in a list.
        budget = self.budget()
        items = list(pieces)
        budget.check_size(sum(len(p) for p in items))
        result = "".join(items)
        budget.built(result)
        return result

    def _finalize(self, value: Any) -> Any:
        # Runs on every {{ expression }} before it becomes text.
        if not isinstance(value, str):
            self.budget().check_text(value)
        return value

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        budget = self.budget()
        if operator == "+" and type(left) is str and type(right) is str:
            # The common case, building the prompt piece by piece: kept cheap.
            result = left + right
            size = len(result)
            budget.allocated += size
            if size > budget.max_value or budget.allocated > budget.max_allocated:
                budget.built(result)  # raises the right error
            return result
        if operator == "*":
            _check_multiply(left, right, budget)
        elif operator == "**":
            _check_power(left, right, budget)
        elif operator == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                budget.check_size(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right, budget)
        result = super().call_binop(context, operator, left, right)
        budget.built(result)
        return result

    def bounded_slice(self, obj: Any, start: Any, stop: Any, step: Any) -> Any:
        value = obj[start:stop:step]
        self.budget().built(value)
        return value

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        budget = __self.budget()
        budget.tick()
        if isinstance(__obj, LoopContext) and args:
            # loop(children) in a recursive for loop iterates a new sequence.
            args = (_CountedLoop(args[0], __self), *args[1:])
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs, budget)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.built(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format / str.format_map of a template string, with bounded fields."""
        name = getattr(value, "__name__", None)
        owner = getattr(value, "__self__", None)
        if name not in ("format", "format_map") or not isinstance(owner, str):
            return None
        formatter: _BoundedFormatter
        if isinstance(owner, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
        else:
            formatter = _BoundedFormatter(self)
        str_type = type(owner)
        is_format_map = name == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return str_type(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    # --- filters ------------------------------------------------------------------

    def _bounded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """`func` with its size-multiplying arguments checked and its result counted."""
        passes = getattr(func, "jinja_pass_arg", None)

        @functools.wraps(func)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget()
            budget.tick()
            user_args = args[1:] if passes is not None else args
            if user_args:
                user_args = _check_filter(name, user_args, kwargs, budget)
                args = (args[0], *user_args) if passes is not None else user_args
            result = func(*args, **kwargs)
            budget.built(result)
            return result

        return bounded


def _check_multiply(left: Any, right: Any, budget: _Budget) -> None:
    if isinstance(left, bool) or isinstance(right, bool):
        return
    if isinstance(left, str | list | tuple) and isinstance(right, int):
        budget.check_size(len(left) * max(right, 0))
    elif isinstance(right, str | list | tuple) and isinstance(left, int):
        budget.check_size(len(right) * max(left, 0))
    elif (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > budget.max_int_bits
    ):
        raise budget.fail("int")


def _check_power(base: Any, exponent: Any, budget: _Budget) -> None:
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base) > 1
        and exponent * math.log2(abs(base)) > budget.max_int_bits
    ):
        raise budget.fail("int")


def _check_str_method(
    owner: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], budget: _Budget
) -> tuple[Any, ...]:
    """Refuses str methods whose result would be over the size limit; returns the args to use."""
    if name in ("center", "ljust", "rjust", "zfill"):
        budget.check_number(_arg(args, kwargs, 0, "width", 0))
    elif name == "expandtabs":
        tabsize = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(tabsize, int):
            budget.check_size(len(owner) + owner.count("\t") * max(tabsize, 0))
    elif name == "replace":
        old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            budget.check_size(_replace_size(owner, old, new, _arg(args, kwargs, 2, "count", -1)))
    elif name == "join" and args:
        items = list(args[0])  # also consumes a generator once, here
        budget.check_size(len(owner) * max(len(items) - 1, 0))
        budget.check_size(sum(len(i) if isinstance(i, str) else 0 for i in items))
        return (items, *args[1:])
    elif name == "translate":
        table = _arg(args, kwargs, 0, "table", None)
        if isinstance(table, dict):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            budget.check_size(len(owner) * longest)
    return args


def _replace_size(text: str, old: str, new: str, count: Any) -> int:
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _check_filter(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], budget: _Budget
) -> tuple[Any, ...]:
    """Checks a filter's arguments (value first) before it runs; returns the args to use."""
    value = args[0]
    if name in _STRINGIFYING_FILTERS:
        budget.check_text(value)
    text = value if isinstance(value, str) else ""
    if name == "center":
        budget.check_number(_arg(args, kwargs, 1, "width", 80))
    elif name == "indent":
        width = _arg(args, kwargs, 1, "width", 4)
        unit = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        budget.check_size(len(text) + (text.count("\n") + 1) * max(unit, 0))
    elif name == "wordwrap":
        wrapstring = _arg(args, kwargs, 3, "wrapstring", None)
        if isinstance(wrapstring, str):
            budget.check_size(len(text) + (len(text) + 1) * len(wrapstring))
    elif name == "replace":
        old, new = _arg(args, kwargs, 1, "old", ""), _arg(args, kwargs, 2, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            budget.check_size(_replace_size(text, old, new, _arg(args, kwargs, 3, "count", None)))
    elif name == "join":
        items = list(value)  # the filter gets the list; a generator is consumed only once
        sep = _arg(args, kwargs, 1, "d", "")
        budget.check_size(len(sep) * max(len(items) - 1, 0) if isinstance(sep, str) else 0)
        budget.check_text(items)
        return (items, *args[1:])
    elif name == "format":
        _check_percent_format(text, args[1:] or kwargs, budget)
    elif name == "batch":
        if _arg(args, kwargs, 2, "fill_with", None) is not None:
            budget.check_number(_arg(args, kwargs, 1, "linecount", 0))
    elif name == "slice":
        slices = _arg(args, kwargs, 1, "slices", 0)
        if isinstance(slices, int) and slices > budget.max_iterations:
            raise budget.fail("iterations")
    elif name == "tojson":
        indent = _arg(args, kwargs, 1, "indent", None)
        if isinstance(indent, int | str) and not isinstance(indent, bool):
            size = len(indent) if isinstance(indent, str) else indent
            if size > 16:
                raise TemplateError(f"the model's chat template asks for a JSON indent of {size}")
    return args


@pass_environment
def _bounded_sum(
    environment: jinja2.Environment,
    iterable: Iterable[Any],
    attribute: str | int | None = None,
    start: Any = 0,
) -> Any:
    """The sum filter; adding up lists goes through the bounded `+` (a sum is quadratic)."""
    sum_filter = FILTERS["sum"]
    if not isinstance(start, list | tuple) or not isinstance(environment, BoundedSandbox):
        return sum_filter(environment, iterable, attribute, start)
    if attribute is not None:
        iterable = map(jinja2.filters.make_attrgetter(environment, attribute), iterable)
    budget = environment.budget()
    total = start
    for item in iterable:
        budget.iterate()
        if isinstance(item, list | tuple):
            budget.check_size(len(total) + len(item))
        total = total + item
        budget.built(total)
    return total


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON as Hugging Face's templates expect it: `ensure_ascii` and friends, no HTML escaping.

    Jinja's own filter escapes `<` and `>` (a tool description would reach
    the model as `\u003c`) and refuses `ensure_ascii`, which GLM's template passes.
    """
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference.

    `limits` and `clock` bound every render (see RenderLimits); both are
    parameters so tests can tighten them or drive time.
    """

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        limits: RenderLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or RenderLimits()
        self.source = source or CHATML_TEMPLATE
        if not isinstance(self.source, str):
            raise TemplateError(
                f"the model's chat template is not text (it is a {type(self.source).__name__})"
            )
        if len(self.source) > self.limits.max_source:
            raise TemplateError(
                f"the model's chat template is too large ({len(self.source):,} characters, "
                f"limit {self.limits.max_source:,})"
            )
        self._env = BoundedSandbox(
            limits=self.limits,
            clock=clock,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.ChainableUndefined,
        )
        self._env.globals["raise_exception"] = _raise_exception
        self._env.globals["strftime_now"] = _strftime_now
        try:
            self._template = self._env.from_string(self.source)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template is invalid: {exc}") from exc
        except RecursionError as exc:
            raise TemplateError("the model's chat template is nested too deeply") from exc
        except (SyntaxError, MemoryError, ValueError, OverflowError) as exc:
            # SyntaxError: Python's compiler refused the generated code (too many nested blocks).
            raise TemplateError(
                f"the model's chat template cannot be compiled: {type(exc).__name__}: {exc}"
            ) from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt for `messages`; TemplateError when the template fails or goes over its limits."""
        variables = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": list(tools) if tools else None,
        }
        budget = self._env.render_budget(_input_size(variables["messages"]) + _input_size(tools))
        try:
            pieces: list[str] = []
            size = 0
            for chunk in self._template.generate(variables):
                size += len(chunk)
                if size > budget.max_output:
                    raise budget.fail("output")
                budget.tick()
                pieces.append(chunk)
            return "".join(pieces)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the model's chat template failed: {exc}") from exc
        except RecursionError as exc:
            raise TemplateError("the model's chat template recursed too deeply") from exc
        except MemoryError as exc:
            raise TemplateError("the model's chat template ran out of memory") from exc
        except Exception as exc:
            # Anything else a hostile or buggy template raises is still its failure,
            # not the engine's: TypeError, ValueError, OverflowError, ZeroDivisionError...
            raise TemplateError(
                f"the model's chat template failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._env.end_render()

    def render_segments(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[tuple[str, bool]] | None:
        """The prompt as (text, is_message_content) pieces, in order.

        Lets the caller tokenize what users wrote without turning text such as
        "<|im_end|>" into control tokens, while the template's own markup still
        becomes them. None when the template transforms contents (a placeholder
        does not come out exactly once): the caller renders plainly then.
        """
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        masked = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
        text = self.render(masked, add_generation_prompt=add_generation_prompt, tools=tools)
        if any(text.count(mark) != 1 for mark in marks):
            return None
        pieces: list[tuple[str, bool]] = []
        for part in _MARK.split(text):
            if _MARK.fullmatch(part):
                content = messages[int(part[1:-1])].get("content")
                pieces.append((content if isinstance(content, str) else "", True))
            elif part:
                pieces.append((part, False))
        return pieces
