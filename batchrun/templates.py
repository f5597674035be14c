"""The prompt template: Jinja2 in a sandbox, parsed once per job, rendered once per row.

Strict about names (a column the input does not have is an error before any row is rendered); a
null cell renders as "" (or as the file wrote it); a typed cell renders as the file wrote it and
behaves as its value. Columns whose names are not Python identifiers are reachable as
`row["first name"]`. A template made only of text and `{{ column }}` renders without Jinja (see
simple_parts); any other is rendered within budgets (range items, loop turns, sizes of `*`, `**`,
widths), so a template cannot take minutes or gigabytes for one row.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Iterator, Optional

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from .errors import InputError



class PromptTemplate:
    """One job's prompt, parsed and checked once: `names` (the columns it reads; "row" when it reads the
    whole row), `parts` (see simple_parts; None when Jinja renders it) and `render(row, where)`."""

    def __init__(self, source: str):
        # a None inside a cell (a struct's null field) renders as "", as a null cell does
        env = _PromptEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                 keep_trailing_newline=True, finalize=_finalize)
        # |tojson prints a cell as the file wrote it when JSON has no type for it (a date, a decimal)
        env.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": str}
        env.filters["tojson"] = _tojson
        for name in ("center", "indent"):
            env.filters[name] = _width_filter(name, env.filters[name])
        self._ranges = env.globals["range"] = _Ranges()
        self._loops = env.globals["_loop_turns"] = _Loops()
        env.globals["lipsum"] = _lipsum
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            raise InputError(f"prompt: template syntax error on line {exc.lineno}: {exc.message}") from None
        _check_self_contained(ast)
        self._env, self._varies = env, _varies(ast)
        self.names: set = meta.find_undeclared_variables(ast)
        self.parts = simple_parts(ast)   # plain "{{ column }}" templates render without Jinja's overhead
        self._template = env.from_string(source)

    @property
    def varies(self) -> bool:
        """True when two renders of one row may differ (see bodies.py: its body is kept): the template draws
        at random or reads the clock or time zone (_varies), or a render made a set (`row.keys() - [...]`),
        whose order is the process's hash seed."""
        return self._varies or self._env.made_set

    def render(self, row: dict, where: str) -> str:
        """The row's prompt through Jinja, within the budgets; InputError (naming `where`) when the template
        fails on the row's cells or asks for too much."""
        clean = {k: (NULL if v is None else v) for k, v in row.items()}
        self._ranges.left, self._loops.left = MAX_RANGE, MAX_LOOP
        try:
            return self._template.render(clean, row=clean)
        except (jinja2.TemplateError, TemplateLimit) as exc:
            raise InputError(f"prompt: cannot render {where}: {exc}") from None
        except (OverflowError, RecursionError, MemoryError) as exc:
            raise InputError(f"prompt: cannot render {where}: the template asks for too much "
                             f"({type(exc).__name__}: {str(exc)[:120]})") from None
        except Exception as exc:   # the template's own error on this row's cells (1/0, "a" + 1, ...)
            raise InputError(f"prompt: cannot render {where}: {type(exc).__name__}: {str(exc)[:200]}") from None


def render_parts(parts: list, row: dict) -> str:
    """A template of simple_parts rendered from a row: exactly what Jinja would make of it."""
    return "".join(part if is_text else _cell(row.get(part)) for is_text, part in parts)


def simple_parts(ast: jinja2.nodes.Template) -> Optional[list]:
    """[(is_text, text or column)] for a template made only of text and `{{ column }}`; else None.

    Such a template renders exactly as Jinja would (a value's str(), a null cell as ""), at a
    fraction of the cost per row.
    """
    from jinja2 import nodes
    parts: list = []
    for node in ast.body:
        if not isinstance(node, nodes.Output):
            return None
        for item in node.nodes:
            if isinstance(item, nodes.TemplateData):
                parts.append((True, item.data))
            elif isinstance(item, nodes.Name) and item.ctx == "load" and item.name != "row":
                parts.append((False, item.name))
            else:
                return None
    return parts


def _cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


class NullCell(str):
    """A null cell in a template: renders as "" (or as the file wrote it: a CSV's NA), is false, and any
    field of it (`{{ meta.lang }}`, `{{ meta["lang"] }}`) is null too: a null struct's fields render ""."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name: str) -> "NullCell":
        if name.startswith("__"):
            raise AttributeError(name)
        return NULL

    def __getitem__(self, key: Any) -> "NullCell":
        return NULL


NULL = NullCell("")


def _written(base: type) -> type:
    """A subclass of `base` whose values render as the text the file wrote (`1.50`, `true`), and
    otherwise behave as the typed value (compare, sum, test in `{% if %}`)."""

    def __str__(self) -> str:
        return self.text

    return type(f"Written{base.__name__.capitalize()}", (base,), {"__str__": __str__})


_WrittenInt, _WrittenFloat = _written(int), _written(float)
_WrittenBool = type("WrittenBool", (_WrittenInt,), {})   # bool cannot be subclassed: an int that was a bool
_WrittenDate, _WrittenDatetime = _written(dt.date), _written(dt.datetime)


def as_written(value: Any, text: Any) -> Any:
    """A typed cell for a template: it renders as `text` (as the file wrote it) and behaves as `value`."""
    if value is None:
        return NULL if text is None or text == "" else NullCell(text)
    if not isinstance(text, str):
        return value
    if isinstance(value, bool):
        cell = _WrittenBool(int(value))
    elif isinstance(value, int):
        cell = _WrittenInt(int(value))
    elif isinstance(value, float):
        cell = _WrittenFloat(value)
    elif isinstance(value, dt.datetime):
        cell = _WrittenDatetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                                value.microsecond, value.tzinfo)
    elif isinstance(value, dt.date):
        cell = _WrittenDate(value.year, value.month, value.day)
    else:
        return text
    cell.text = text
    return cell


def _json_ready(value: Any) -> Any:
    """A template's value for |tojson: a null cell is null (not ""), a bool cell true/false (not 1/0)."""
    if isinstance(value, NullCell):
        return None
    if isinstance(value, _WrittenBool):
        return bool(value)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


@jinja2.pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: Optional[int] = None) -> Any:
    return jinja2.filters.do_tojson(eval_ctx, _json_ready(value), indent)


def _finalize(value: Any) -> Any:
    return "" if value is None else value


class TemplateLimit(Exception):
    """A template asks for more than a prompt can hold (e.g. range(10**9))."""


MAX_RANGE = 10_000   # items the range() calls of one row's render may give in all (loops in loops count)


class _Ranges:
    """A template's `range`, with a budget of MAX_RANGE items for each row's render (the sandbox's own
    allows 100,000 per call, so a loop in a loop could run for hours)."""

    def __init__(self) -> None:
        self.left = MAX_RANGE

    def __call__(self, *args: int) -> range:
        items = range(*args)
        self.left -= len(items)
        if self.left < 0:
            raise TemplateLimit(f"range({', '.join(map(str, args))}) takes the template's loops past {MAX_RANGE:,} "
                                "items for one row (a huge range, or a range in a loop)")
        return items


MAX_RESULT = 1 << 20   # characters (or items) a template's `*` may make, and digits its `**` may make
MAX_LOOP = 1_000_000   # turns the {% for %} loops of one row's render may take in all (loops in loops count)
MAX_LIPSUM = 100       # paragraphs lipsum() may make: lipsum(10**6) would take minutes


class _Loops:
    """What each `{% for %}` iterates over, counted against MAX_LOOP turns for each row's render: a loop over
    a long cell inside another would otherwise run for hours (range() has its own, smaller budget)."""

    def __init__(self) -> None:
        self.left = MAX_LOOP

    def __call__(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.left -= 1
            if self.left < 0:
                raise TemplateLimit(f"the template's {{% for %}} loops take more than {MAX_LOOP:,} turns for one "
                                    "row (a loop over a long value inside another loop?)")
            yield item


def _lipsum(n: int = 5, *args: Any, **kwargs: Any) -> str:
    if not isinstance(n, int) or n > MAX_LIPSUM:
        raise TemplateLimit(f"lipsum({n}) is too large for a prompt (at most {MAX_LIPSUM} paragraphs)")
    return jinja2.utils.generate_lorem_ipsum(n, *args, **kwargs)


MAX_PROMPT = 256 * 1000 * 1000   # characters: a longer prompt is past the API's 256 MB and can never be sent


def _check_widths(name: str, args: tuple) -> None:
    for arg in args:
        if isinstance(arg, int) and arg > MAX_RESULT:
            raise TemplateLimit(f"{name}({arg:,}) is too large for a prompt")


def _width_filter(name: str, filter_: Callable) -> Callable:
    """Jinja's filter `name`, refusing a width past MAX_RESULT (`|center(10**9)`, `|indent(10**9)`)."""
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_widths(name, (*args, *kwargs.values()))
        return filter_(value, *args, **kwargs)
    return checked


class _PromptEnvironment(SandboxedEnvironment):
    """The sandbox, with `*` and `**` kept to what a prompt can hold: `"x" * 10**9` or `10**10**10`
    would take minutes and gigabytes before any limit of the API said no."""

    intercepted_binops = frozenset(["*", "**", "-"])
    made_set = False   # a `-` made a set (of dict keys or items): its order differs from one process to the next

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_RESULT:
                    raise TemplateLimit(f"{type(seq).__name__} * {times:,} is too large for a prompt")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * max(1, abs(left).bit_length()) > MAX_RESULT:
            raise TemplateLimit(f"{left} ** {right} is too large for a prompt")
        result = super().call_binop(context, operator, left, right)
        if operator == "-" and isinstance(result, (set, frozenset)):
            self.made_set = True
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:   # noqa: N805 (Jinja's)
        """A text method asked for a width past MAX_RESULT (`body.ljust(10**9)`, `.zfill`, `.center`) is refused
        before it makes a gigabyte."""
        if isinstance(getattr(__obj, "__self__", None), str):
            _check_widths(getattr(__obj, "__name__", "method"), (*args, *kwargs.values()))
        return super().call(__context, __obj, *args, **kwargs)

    def _generate(self, source: Any, *args: Any, **kwargs: Any) -> str:
        """Compile with every `{% for %}`'s iterable passed through `_loop_turns` (a _Loops: the turns counted)."""
        from jinja2 import nodes
        for loop in source.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name("_loop_turns", "load"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        return super()._generate(source, *args, **kwargs)


# what a template may call on a cell that reads the clock (`created.now()`, a classmethod reached through a
# date cell) or this machine's time zone (a naive time's `.timestamp()` or `.astimezone()`)
_MACHINE_ATTRS = frozenset({"now", "today", "utcnow", "timestamp", "astimezone"})


def _varies(ast: jinja2.nodes.Template) -> bool:
    """True when two renders of one row may differ: the template draws at random (`|random`, also through
    map/select, or `lipsum()`), or reads the clock or the machine's time zone (_MACHINE_ATTRS)."""
    from jinja2 import nodes
    return any(f.name == "random" for f in ast.find_all(nodes.Filter)) or \
        any(n.name == "lipsum" for n in ast.find_all(nodes.Name)) or \
        any(c.value == "random" or c.value in _MACHINE_ATTRS for c in ast.find_all(nodes.Const)
            if isinstance(c.value, str)) or \
        any(a.attr in _MACHINE_ATTRS for a in ast.find_all(nodes.Getattr))


def _check_self_contained(ast: jinja2.nodes.Template) -> None:
    """Refuse the tags that read other templates: a prompt is one template, and there are none to read."""
    from jinja2 import nodes
    tags = ((nodes.Include, "include"), (nodes.Import, "import"), (nodes.FromImport, "from ... import"),
            (nodes.Extends, "extends"))
    for kind, tag in tags:
        node = next(iter(ast.find_all(kind)), None)
        if node is not None:
            raise InputError(f"prompt: {{% {tag} %}} on line {node.lineno} is not supported: a prompt is one "
                             "template, it cannot read others (put the text in the prompt, or use prompt_file)")
