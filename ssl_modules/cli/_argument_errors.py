"""Bad command lines in one short message: did-you-mean for an unknown option, argument or class, a constructor's
refusal of its arguments, and jsonargparse's errors of ``evaluate`` and ``export`` in one line."""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable

from ssl_modules.cli._class_packages import class_package_names
from ssl_modules.cli._errors import PACKAGES

__all__ = ["did_you_mean", "did_you_mean_class", "short_argument_error", "short_parse_error", "refused_arguments"]


def _init_parameters(cls: type) -> list[str]:
    """Every keyword a class's constructor accepts, following ``**kwargs`` into the base classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def did_you_mean(message: str) -> str | None:
    """A short message for an unknown constructor argument in a jsonargparse error, with the closest names."""
    option = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected"
                       r'|No action for key "([^"]+)"', message)  # the last: jsonargparse < 4.32
    owner = re.search(r"class_path '([^']+)'", message)
    if not option:
        return None
    name = next(group for group in option.groups() if group)
    name = name.rsplit(".", 1)[-1]
    candidates: list[str] = []
    label = "this class"
    if owner:
        label = owner.group(1)
        with contextlib.suppress(Exception):
            candidates = _init_parameters(_resolve_class(owner.group(1)))
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{label} has no argument {name!r}{hint}"


def _resolve_class(class_path: str) -> type:
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    for package in class_package_names():
        with contextlib.suppress(AttributeError):
            return getattr(importlib.import_module(package), class_path)
    raise LookupError(class_path)


_UNKNOWN_CLASS = (r"Expected a dot import path string: (\S+)", r"Expected a path but (\S+) either not accessible",
                  r"Problem with given class_path '([^']+)':\s*(?:module '[^']*' has no attribute|No module named)",
                  r"module '[\w.]+' has no attribute '(\w+)'")  # the wordings of jsonargparse 4.27 to 4.53


def did_you_mean_class(message: str) -> str | None:
    """A short message for a class path that names no class in a jsonargparse error (``--model VicRegL``,
    ``--trainer.callbacks+=KnnProbe``), with the closest class names the option accepts."""
    given = next((m.group(1) for pattern in _UNKNOWN_CLASS if (m := re.search(pattern, message))), None)
    if given is None:
        return None
    key = re.search(r'Parser key "([^"]+)"', message)
    where = f" for --{key.group(1)}" if key else ""
    classes = _accepted_classes(message)
    close = _closest_names(given.rpartition(".")[2], [cls.__name__ for cls in classes])
    if close:
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?"
    else:
        ours = sorted(cls.__name__ for cls in classes if cls.__module__.partition(".")[0] in PACKAGES)
        hint = (f"the library's are {', '.join(ours)}; " if ours else "") + \
            "a class of your own needs its import path, e.g. my_package.MyClass, importable from the current folder"
    return f"no class {given!r}{where}: {hint}"


def _closest_names(wanted: str, names: list[str]) -> list[str]:
    """The names closest to ``wanted``, ignoring case: the one that differs only in case, else up to three
    about as close as the closest."""
    by_lower = {name.lower(): name for name in names}
    if wanted.lower() in by_lower:
        return [by_lower[wanted.lower()]]
    scored = sorted(((difflib.SequenceMatcher(None, wanted.lower(), lower).ratio(), name)
                     for lower, name in by_lower.items()), reverse=True)
    best = scored[0][0] if scored else 0.0
    return [name for ratio, name in scored[:3] if ratio >= max(0.6, best - 0.05)]


def _accepted_classes(message: str) -> list[type]:
    """The public classes a jsonargparse union error says the option accepts (``Subtypes: [...]``): every
    imported subclass of each (LightningCLI resolves them by their short name), the bases themselves excluded."""
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    if not subtypes:
        return []
    found: list[type] = []
    for dotted in dict.fromkeys(re.findall(r"([A-Za-z_][\w.]*\.[A-Z]\w*)", subtypes.group(1))):
        with contextlib.suppress(Exception):
            base = _resolve_class(dotted)
            found += [cls for cls in _subclasses(base)[1:] if not cls.__name__.startswith("_") and cls not in found]
    return found


def _subclasses(base: type) -> list[type]:
    """``base`` and every subclass of it imported so far."""
    found, queue = [], [base]
    while queue:
        cls = queue.pop(0)
        if cls not in found:
            found.append(cls)
            queue.extend(cls.__subclasses__())
    return found


def short_argument_error(error: Exception, subcommand: str) -> str:
    """A jsonargparse error of LightningCLI (``fit``, ``validate``, ...) as a short message: did-you-mean where
    an argument or class is unknown, else its first lines."""
    message = str(error)
    hint = did_you_mean(message) or did_you_mean_class(message)
    tail = f"(python -m ssl_modules {subcommand} --help lists the options)"
    if hint:
        return f"error: {hint} {tail}"
    lines = [line for line in message.splitlines() if line.strip()][:8]
    return "error: " + "\n  ".join(lines) + f"\n{tail}"


# ------------------------------------------------------------------------------- refused arguments
def _constructed_class(error: BaseException) -> type | None:
    """The class whose ``__init__`` raised ``error`` (the outermost constructor in its traceback), or None."""
    frame_tb = error.__traceback__
    while frame_tb is not None:
        frame = frame_tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"])
        frame_tb = frame_tb.tb_next
    return None


def _refused(error: BaseException) -> tuple[type, BaseException] | None:
    """The constructor that refused its arguments behind ``error`` (following the chain of causes, as
    jsonargparse wraps a constructor's error in its union error), and its own exception."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        owner = _constructed_class(current)
        if owner is not None and isinstance(current, (ValueError, MisconfigurationException)):
            return owner, current
        current = current.__cause__ or current.__context__
    return None


def _section_of(owner: type) -> str | None:
    """The option of the command line that configures instances of ``owner``."""
    from lightning.pytorch import Callback, LightningDataModule, Trainer

    from ssl_modules.methods.base import SSLModule

    for base, option in ((SSLModule, "--model"), (LightningDataModule, "--data"), (Callback, "--trainer.callbacks"),
                         (Trainer, "--trainer")):
        if issubclass(owner, base):
            return option
    return None


def _given_arguments(argv: list[str], option: str) -> list[str]:
    """The arguments of ``argv`` under ``option`` (``--model`` -> ``--model.init_args.lr 0.1``), with values."""
    given: list[str] = []
    for position, token in enumerate(argv):
        name = token.split("=", 1)[0].rstrip("+")
        if name != option and not name.startswith(option + "."):
            continue
        if option == "--trainer" and name.startswith("--trainer.callbacks"):
            continue
        given.append(token)
        following = argv[position + 1] if position + 1 < len(argv) else None
        if "=" not in token and following is not None and not following.startswith("--"):
            given.append(following)
    return given


def refused_arguments(error: BaseException, argv: list[str], subcommand: str) -> str | None:
    """A short message when ``error`` is a constructor refusing the arguments the config and command line gave
    it (the class, its own message, the arguments given for it), or None for any other error."""
    import shlex

    refused = _refused(error)
    if refused is None:
        return None
    owner, cause = refused
    option = _section_of(owner)
    label = f"{owner.__qualname__} ({option})" if option else owner.__qualname__
    given = _given_arguments(argv, option) if option else []
    configs = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--config"]
    source = f"given: {shlex.join(given)}" if given else f"from the config {' '.join(configs)}" if configs else ""
    lines = [f"error: {label} refused its arguments: {cause}"]
    if source:
        lines.append(f"  {source}")
    if option == "--trainer" and _asks_for_a_missing_gpu(cause):
        lines.append(f"  this machine has no GPU; to try the config on its CPU add: {' '.join(CPU_OVERRIDES)} "
                     "(and a smaller --data.init_args.batch_size)")
    lines.append(f"(python -m ssl_modules {subcommand} --help lists the options)")
    return "\n".join(lines)


#: What turns a multi-GPU paper config into a one-process CPU run (docs/failures.md).
CPU_OVERRIDES = ("--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.strategy", "auto", "--trainer.precision", "32-true")


def _asks_for_a_missing_gpu(cause: BaseException) -> bool:
    """Whether the Trainer refused a GPU accelerator that this machine lacks (Lightning's wordings)."""
    text = str(cause).lower()
    return any(words in text for words in ("no supported gpu backend", "cuda is not available",
                                           "gpuaccelerator` can not run on your system"))


# ------------------------------------------------------------------------------- evaluate and export
_TYPE_NAMES = {"<class 'int'>": "an int", "<class 'float'>": "a float", "<class 'str'>": "a string",
               "<class 'bool'>": "true or false", "<class 'NoneType'>": "null", "<class 'dict'>": "a mapping",
               "<class 'list'>": "a list"}


def short_parse_error(message: str, command: str, options: Iterable[str]) -> str:
    """One line for a jsonargparse error of ``evaluate`` or ``export``: the option, what it takes and what was
    given, or the unknown option with the closest of ``options``; ends with where the options are listed."""
    tail = f"(python -m ssl_modules {command} --help lists the options)"
    return f"error: {_what_is_wrong(message, list(options))} {tail}"


def _what_is_wrong(message: str, options: list[str]) -> str:
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
        return _unknown_options(unknown.group(1).split(), options)
    in_group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", message)
    if in_group:
        return _unknown_options([f"--{in_group.group(1)}.{in_group.group(2)}"], options, where=" (in the config)")
    not_accepted = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected", message)
    if not_accepted:
        key = next(group for group in not_accepted.groups() if group)
        return _unknown_options([f"--{key}"], options, where=" (in the config)")
    found = re.search(r'Parser key "([^"]+)"', message)
    if found is None:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    key = _as_written(f"--{found.group(1)}", options)
    expected = [_type_name(name) for name in
                re.findall(r"Expected an? ((?:<class '\w+'>|typing\.Literal\[[^\]]*\]|[\w.]+))", message)]
    given = re.search(r"(?:Given value|Got value): (.*)", message)
    if not expected or given is None:
        detail = " ".join(line.strip() for line in message[found.end():].splitlines() if line.strip(": "))
        return f"{key}: {detail.lstrip(': ')}"
    return f"{key} takes {' or '.join(dict.fromkeys(expected))}, not {given.group(1).strip()}"


def _as_written(option: str, options: list[str]) -> str:
    """``option`` as the help writes it (jsonargparse names ``--voc-linear.x`` ``voc_linear.x`` in its errors)."""
    return next((name for name in options if name.replace("-", "_") == option.replace("-", "_")), option)


def _type_name(name: str) -> str:
    """``<class 'int'>`` -> ``an int``; ``typing.Literal['a', 'b']`` -> ``one of a, b``."""
    if name.startswith("typing.Literal["):
        return "one of " + ", ".join(re.findall(r"'([^']*)'", name))
    return _TYPE_NAMES.get(name, name)


def _unknown_options(tokens: list[str], options: list[str], where: str = "") -> str:
    names = [token.split("=", 1)[0] for token in tokens if token.startswith("--")]
    if not names:
        return f"unexpected argument{'s' if len(tokens) > 1 else ''} {' '.join(tokens)}{where}"
    settings = [name for name in options if not any(other.startswith(name + ".") for other in options)]
    close = _closest_names(names[0], settings)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown option {names[0]}{where}{hint}"
