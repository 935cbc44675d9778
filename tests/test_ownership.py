"""Each piece of knowledge lives in one module: the test reads the package's source (its AST).

- A lever's choices are named only in its own module (`advisor.levers`) and the config schema
  (`advisor.config`): any other string equal to one of a lever's names fails here, an enum's or a
  constant's too, so a name hidden behind a new spelling doesn't pass. A name that is also an
  ordinary word of the code base (offload's "model", also the pipeline a command is about) is
  allowed where it names a key.
- Optuna's storage is read and written through `advisor.run.trials` alone: no other module names a
  trial's or study's attribute, or spells a status (source, claim state) as a string.
"""

import ast
import sys
from pathlib import Path

import pytest

from advisor.levers import LEVERS
from advisor.levers.quantization import BACKENDS as QUANT_BACKENDS
from advisor.run.trials import ClaimState, Source, Status


PACKAGE = Path(__file__).resolve().parent.parent / "advisor"
STORE = PACKAGE / "run" / "trials.py"
OPTUNA_ATTRIBUTES = {"user_attrs", "system_attrs", "set_user_attr", "set_system_attr"}
STORED_NAMES = {member.value for enum in (Status, Source, ClaimState) for member in enum}


SCHEMA = tuple(sorted((PACKAGE / "config").glob("*.py")))  # the config and its sections


def package_sources(but: Path | tuple[Path, ...]):
    but = (but,) if isinstance(but, Path) else but
    for path in sorted(PACKAGE.rglob("*.py")):
        if path not in but:
            yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text())


def module_of(lever) -> tuple[Path, ...]:
    """The files of a lever's module: the module, or every module of its package."""
    path = Path(sys.modules[type(lever).__module__].__file__)
    return tuple(sorted(path.parent.glob("*.py"))) if path.name == "__init__.py" else (path,)


# Choice names that are also ordinary words of the code base, and what else they name there.
ORDINARY_WORDS = {"model": "the pipeline a command is about: the request's field and flag, the JSON's key"}
MAPPING_KEYS = {"get", "pop", "setdefault"}


def keys_in(tree: ast.AST) -> set[int]:
    """The nodes of `tree` that name a key: a dict literal's keys, subscripts, a mapping's get/pop key."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys.update(id(key) for key in node.keys if key is not None)
        elif isinstance(node, ast.Subscript):
            keys.add(id(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MAPPING_KEYS:
            keys.update(id(arg) for arg in node.args[:1])
    return keys


def named(tree: ast.AST, names: frozenset[str]) -> list[str]:
    """Where `tree` has a string constant equal to one of `names`; an ordinary word (`ORDINARY_WORDS`)
    wherever it decides something (compared, assigned, passed, returned, a collection's member), but
    not where it names a key."""
    keys = keys_in(tree)
    return [
        f"{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value in names
        and not (node.value in ORDINARY_WORDS and id(node) in keys)
    ]


def test_every_searched_lever_names_its_choices():
    # The levers that are not searched (a flag the adjust rules set: channels_last, the VAE's tiling)
    # have no choice names to hide.
    assert [lever.name for lever in LEVERS if lever.searched and not lever.names] == []
    assert [lever.name for lever in LEVERS if "none" in lever.names] == []


# Each lever and each quantization backend (a lever of its own module, `advisor.levers.quantization`).
OWNERS = [*(lever for lever in LEVERS if lever.names), *(backend for backend in QUANT_BACKENDS if backend.names)]


@pytest.mark.parametrize("owner", OWNERS, ids=lambda owner: type(owner).__module__.rsplit(".", 1)[-1])
def test_a_levers_choices_are_named_only_in_its_module_and_the_config_schema(owner):
    assert [
        f"{name}:{where}"
        for name, tree in package_sources(but=(*module_of(owner), *SCHEMA))
        for where in named(tree, owner.names)
    ] == []


def optuna_attributes(tree: ast.AST) -> list[str]:
    """Where `tree` reads or writes optuna's user or system attributes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in OPTUNA_ATTRIBUTES:
            found.append(f"{node.lineno} .{node.attr}")
        if isinstance(node, ast.keyword) and node.arg == "user_attrs":
            found.append(f"{node.value.lineno} user_attrs=")
    return found


def spelled_statuses(tree: ast.AST) -> list[str]:
    """Where `tree` spells a stored status, source or claim state as a string: in a comparison
    (``status == "ok"``, ``in ("ok", ...)``), a ``status=`` or ``source=`` argument, or such a dict entry."""

    def stored(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in STORED_NAMES

    spelled = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            spelled += [c for side in (node.left, *node.comparators) for c in ast.walk(side) if stored(c)]
        elif isinstance(node, ast.keyword) and node.arg in ("status", "source") and stored(node.value):
            spelled.append(node.value)
        elif isinstance(node, ast.Dict):
            spelled += [
                v
                for k, v in zip(node.keys, node.values)
                if isinstance(k, ast.Constant) and k.value in ("status", "source") and stored(v)
            ]
    return [f"{c.lineno} {c.value!r}" for c in spelled]


def test_only_the_study_store_touches_optuna_attributes():
    assert [f"{name}:{where}" for name, tree in package_sources(but=STORE) for where in optuna_attributes(tree)] == []


def test_statuses_are_spelled_as_the_enum_outside_the_store():
    assert [f"{name}:{where}" for name, tree in package_sources(but=STORE) for where in spelled_statuses(tree)] == []


def test_the_checks_find_what_they_forbid():
    # an enum elsewhere that spells a lever's names does not hide them
    hidden = ast.parse('class CacheKind(Enum):\n    MAG = "mag"\nif config.cache.kind == CacheKind.MAG: pass\n')
    assert named(hidden, frozenset({"mag"})) == ["2 'mag'"]
    # an ordinary word is a choice where it decides, not where it names a key
    model = ast.parse(
        'if config.offload.strategy == "model": pass\n'
        'ORDER = ("none", "model")\n'
        'out = {"model": profile.model_id}\n'
        'given = namespace.pop("model", None) or namespace["model"]\n'
    )
    assert named(model, frozenset({"model"})) == ["1 'model'", "2 'model'"]
    tree = ast.parse(
        'trial.set_user_attr("x", 1)\n'
        'study.enqueue_trial(params, user_attrs={"seeded_by": "rules"})\n'
        'if t.user_attrs["source"] == "measured" or r.status in {"ok", "oom"}: pass\n'
        'm = Measurement(status="crash")\n'
        'result = {"status": "timeout"}\n'
    )
    assert optuna_attributes(tree) == ["1 .set_user_attr", "2 user_attrs=", "3 .user_attrs"]
    assert sorted(spelled_statuses(tree)) == ["3 'measured'", "3 'ok'", "3 'oom'", "4 'crash'", "5 'timeout'"]
