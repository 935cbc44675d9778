"""Fuzzing the command line with bad input (hypothesis), through the real entry point in-process.

Whatever is wrong (a size, a dimension, a timeout, a path, a corrupt model folder, a config file of
the wrong shape), the advisor must refuse it the way a user can act on: a non-zero exit status, no
traceback, and stderr ending in one ``advisor: error: ...`` line (``advisor: warning: ...`` lines
may come before it). The error must also be a real one, not the last-resort line for a bug.
Nothing here is measured or traced: every input is refused before that, so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest


# Hypothesis keeps a cache of constants (and, unless told not to, examples) in ./.hypothesis; the
# work tree is no place for it. Read when first needed, so setting it before the tests run is enough.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "advisor-hypothesis"))

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from advisor.cli import main  # noqa: E402
from advisor.probe.layout import catalog_names


# Fixtures are built once per module; each example only rewrites a file and restores it.
FUZZ = settings(
    deadline=None,
    max_examples=40,
    database=None,  # no .hypothesis folder in the work tree; failures print their example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_refused(argv: list[str]) -> str:
    """The property: refused with one error line (warnings may precede it); returns that line."""
    code, _out, err = run_cli(argv)
    assert "Traceback (most recent call last)" not in err, err
    assert code not in (0, None), (argv, code, err)
    lines = err.strip().splitlines()
    assert lines, (argv, code)
    assert lines[-1].startswith("advisor: error: "), (argv, err)
    assert all(line.startswith("advisor: warning: ") for line in lines[:-1]), (argv, err)
    assert "(a bug in the advisor" not in lines[-1], (argv, err)  # a known kind of bad input deserves a real message
    return lines[-1]


# --- generated bad values -------------------------------------------------------------------------

# Characters that appear in no size, so a string holding one can't parse as one.
_JUNK = "€✓ßxyzØ!?#&%§ñ中"
_SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_UNITS = st.sampled_from(["", "B", "KB", "MB", "GB", "GiB", "T", "p"])
_NUMBER = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(str), st.floats(min_value=0, max_value=1e6).map(repr)
)

bad_sizes = st.one_of(
    st.builds(lambda n, u: f"-{n}{u}", _NUMBER, _UNITS),  # negative
    st.sampled_from(
        ["nan", "inf", "-inf", "NaN GB", "infGB", "Infinity", "1e999", "1e999GB", "", " ", "GB", "0", "0GB", "0.0 MiB"]
    ),
    st.integers(min_value=1, max_value=2**20 - 1).map(str),  # a bare number: bytes, no GPU holds so few
    st.builds(lambda n, u: f"{n}{u}", st.integers(min_value=2**61, max_value=10**40), _UNITS),  # more than any machine
    st.builds(lambda a, j, b: a + j + b, _SAFE_TEXT, st.sampled_from(list(_JUNK)), _SAFE_TEXT),  # unicode junk
)

LIMITS = {"--height": 32768, "--width": 32768, "--frames": 1025, "--steps": 10000, "--batch": 256}  # docs/cli.md
dimension_flags = st.sampled_from(list(LIMITS))


@st.composite
def bad_dimensions(draw) -> tuple[str, str]:
    flag = draw(dimension_flags)
    value = draw(
        st.one_of(
            st.just(0),
            st.integers(max_value=-1),
            st.integers(min_value=LIMITS[flag] + 1, max_value=10**40),
            st.sampled_from(["1.5", "1e3", "", "abc", "0x10", "nan", "12 px"]),
        )
    )
    return flag, str(value)


bad_timeouts = (
    st.one_of(
        st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf]),
        st.floats(max_value=0.0, allow_nan=False),
    )
    .map(repr)
    .map(lambda text: {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(text, text))
)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    """Paths of every wrong kind: a folder, a regular file, a name too long for any file system."""
    root = tmp_path_factory.mktemp("bad-paths")
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("not a folder, not a config")
    return root


@pytest.fixture(scope="module")
def model_copy(tiny_flux_dir, tmp_path_factory):
    """A writable copy of the tiny Flux pipeline; examples corrupt one file and put it back."""
    folder = tmp_path_factory.mktemp("fuzz-model") / "flux"
    shutil.copytree(tiny_flux_dir, folder)
    return folder


@contextlib.contextmanager
def replaced(path: Path, text: str):
    original = path.read_bytes()
    path.write_text(text)
    try:
        yield
    finally:
        path.write_bytes(original)


# --- sizes, dimensions, timeouts ------------------------------------------------------------------


@FUZZ
@given(
    flag=st.sampled_from(["--budget", "--vram", "--ram"]),
    value=bad_sizes,
    command=st.sampled_from(["recommend", "estimate"]),
)
@example(flag="--ram", value="0", command="recommend")  # once blamed --budget
@example(flag="--budget", value="1e999", command="recommend")
def test_bad_sizes_are_refused_naming_the_flag(flag, value, command):
    if command == "estimate" and flag == "--budget":
        flag = "--vram"  # estimate has no budget
    base = ["recommend", "--gpu", "H100"] if command == "recommend" else ["estimate", "flux-dev"]
    line = assert_refused([*base, flag, value])
    # Either the advisor names the flag, or click refused the value as an option (a value like '-x').
    assert flag in line or "option" in line.lower(), line


@FUZZ
@given(bad=bad_dimensions(), command=st.sampled_from(["recommend-image", "recommend-video", "estimate-image"]))
@example(bad=("--frames", str(10**30 + 1)), command="recommend-video")
@example(bad=("--steps", str(10**30)), command="estimate-image")
def test_bad_dimensions_are_refused_naming_the_flag(bad, command):
    flag, value = bad
    model = "wan2.1-t2v-1.3b" if command.endswith("video") else "flux-dev"
    base = (
        ["recommend", "-m", model, "--gpu", "H100"]
        if command.startswith("recommend")
        else ["estimate", model, "--gpu", "H100"]
    )
    line = assert_refused([*base, flag, value])
    assert flag in line, line
    assert not line.startswith("advisor: error: argument "), (
        line
    )  # the house style, not argparse's "invalid int value"


@FUZZ
@given(timeout=bad_timeouts, bad=st.one_of(st.none(), bad_dimensions()))
@example(timeout="nan", bad=None)
@example(timeout="-inf", bad=None)
def test_tune_refuses_bad_timeouts_and_dimensions_before_measuring(timeout, bad, tiny_flux_dir, monkeypatch):
    import advisor.run.tune

    def measured(*args, **kwargs):
        raise AssertionError("tune measured a trial for a command it should have refused")

    monkeypatch.setattr(advisor.run.tune, "run_study", measured)
    extra = list(bad) if bad else []
    line = assert_refused(["tune", "--budget", "4GB", "-m", str(tiny_flux_dir), "--trial-timeout", timeout, *extra])
    assert "--trial-timeout" in line or (bad and bad[0] in line) or "option" in line.lower(), line


# --- paths ----------------------------------------------------------------------------------------


@st.composite
def bad_output_paths(draw, root: Path) -> str:
    """Paths no output can be written to (a missing folder is fine for an output: it is created)."""
    name = draw(
        st.text(st.sampled_from("abcxyz_-.0123456789é"), min_size=1, max_size=8).filter(lambda n: n not in {".", ".."})
    )
    kind = draw(st.sampled_from(["folder", "under a file", "deep under a file", "too long", "too long folder"]))
    return {
        "folder": str(root / "a_folder"),
        "under a file": str(root / "a_file" / f"{name}.json"),
        "deep under a file": str(root / "a_file" / name / "x" / "advisor.json"),
        "too long": str(root / ((name * 300)[:300] + ".json")),
        "too long folder": str(root / (name * 300)[:300] / "advisor.json"),
    }[kind]


@FUZZ
@given(data=st.data())
def test_unwritable_outputs_are_refused_up_front(data, playground, tiny_flux_dir, monkeypatch):
    import advisor.run.tune

    monkeypatch.setattr(
        advisor.run.tune, "run_study", lambda *a, **k: pytest.fail("measured before refusing the output")
    )
    path = data.draw(bad_output_paths(playground))
    command = data.draw(st.sampled_from(["recommend -o", "tune -o", "tune --report"]))
    if command == "recommend -o":
        argv = ["recommend", "--gpu", "H100", "-o", path]
    elif command == "tune -o":
        argv = ["tune", "--budget", "4GB", "-m", str(tiny_flux_dir), "-o", path]
    else:  # a report is a folder: an existing regular file is the wrong kind
        path = str(playground / "a_file") if path == str(playground / "a_folder") else path
        argv = ["tune", "--budget", "4GB", "-m", str(tiny_flux_dir), "--report", path]
    line = assert_refused(argv)
    assert line.startswith(f"advisor: error: {command.split()[1]}"), line
    assert {p.name for p in playground.iterdir()} <= {"a_file", "a_folder", "fuzz-config.json"}  # nothing was created


@FUZZ
@given(data=st.data())
def test_config_paths_that_are_not_config_files_are_refused(data, playground):
    name = data.draw(st.text(st.sampled_from("abcxyz_-0123456789"), min_size=1, max_size=8))
    path = data.draw(
        st.sampled_from(
            [
                str(playground / "a_folder"),
                str(playground / "a_file"),  # exists, but not JSON
                str(playground / "a_file" / f"{name}.json"),
                str(playground / "missing" / f"{name}.json"),
                str(playground / ((name * 300)[:300] + ".json")),
            ]
        )
    )
    line = assert_refused(["estimate", "flux-dev", "--gpu", "H100", "--config", path])
    assert line.startswith(f"advisor: error: --config {path}: "), line


# --- config files of the wrong shape --------------------------------------------------------------

_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), _SAFE_TEXT
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_SAFE_TEXT, inner, max_size=3),
    max_leaves=8,
)
_KNOWN_KEYS = (
    "schema_version",
    "dtype",
    "device",
    "quantization",
    "layerwise_casting",
    "offload",
    "compile",
    "vae",
    "attention_backend",
    "channels_last",
    "provenance",
)


def _deep(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth


bad_config_texts = st.one_of(
    _JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps),  # not an object
    st.dictionaries(_SAFE_TEXT.filter(lambda k: k not in _KNOWN_KEYS), _JSON, min_size=1, max_size=3).map(
        lambda d: json.dumps({"schema_version": 1, **d})
    ),  # unknown keys
    _JSON.filter(lambda v: v != 1 or isinstance(v, bool)).map(
        lambda v: json.dumps({"schema_version": v})
    ),  # not version 1
    st.builds(
        lambda key, value: json.dumps({"schema_version": 1, key: value}),
        st.sampled_from(["dtype", "offload", "quantization", "vae", "compile", "channels_last"]),
        st.one_of(
            st.integers(),
            st.lists(st.integers(), max_size=2),
            _SAFE_TEXT.filter(lambda t: t not in {"bfloat16", "float16", "float32"}),
        ),
    ),  # a known key holding the wrong type
    _SAFE_TEXT.filter(lambda t: t not in {"cpu", "cuda"} and not t.startswith("cuda:")).map(
        lambda device: json.dumps({"schema_version": 1, "device": device})
    ),
    st.builds(_deep, st.integers(min_value=65, max_value=20_000), st.sampled_from(["array", "object"])),
    st.integers(min_value=4301, max_value=6000).map(
        lambda n: '{"schema_version": 1, "offload": {"num_blocks_per_group": ' + "7" * n + "}}"
    ),
    st.binary(max_size=20)
    .map(lambda b: b.decode("latin-1"))
    .filter(lambda t: t.strip() not in {"", "{}"})
    .map(lambda t: "\x00" + t),
)


@FUZZ
@given(text=bad_config_texts)
@example(text='{"schema_version": true}')
@example(text='{"schema_version": 1, "device": "banana"}')
@example(text=_deep(100_000, "array"))
def test_config_files_of_the_wrong_shape_are_one_config_error(text, playground):
    path = playground / "fuzz-config.json"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    line = assert_refused(["estimate", "flux-dev", "--gpu", "H100", "--config", str(path)])
    assert line.startswith(f"advisor: error: --config {path}: "), line


# --- corrupt model folders ------------------------------------------------------------------------

# A component entry that is not a [library, class] pair of names.
_NOT_A_PAIR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    _SAFE_TEXT,
    st.dictionaries(_SAFE_TEXT, _JSON_SCALARS, max_size=2),
    st.lists(_SAFE_TEXT, min_size=3, max_size=4),
    st.lists(_SAFE_TEXT, max_size=1),
    st.tuples(st.integers(), _SAFE_TEXT).map(list),
)
# The tiny Flux transformer's fields the advisor reads, each with values of a kind it can't be.
_WRONG_FIELD = st.one_of(
    st.tuples(
        st.sampled_from(
            "num_layers num_single_layers in_channels joint_attention_dim pooled_projection_dim num_attention_heads attention_head_dim patch_size".split()
        ),
        st.one_of(
            _SAFE_TEXT,
            st.booleans(),
            st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
            st.integers(max_value=-1),
            st.lists(_SAFE_TEXT, min_size=1, max_size=2),
            st.dictionaries(_SAFE_TEXT, st.integers(), min_size=1, max_size=2),
        ),
    ),
    st.tuples(
        st.just("guidance_embeds"),
        st.one_of(_SAFE_TEXT, st.integers(), st.lists(st.booleans(), min_size=1, max_size=2)),
    ),
)


@FUZZ
@given(data=st.data())
def test_corrupt_model_folders_are_one_model_error_naming_the_file(data, model_copy):
    what = data.draw(
        st.sampled_from(
            [
                "index not an object",
                "index entry",
                "class name",
                "config field",
                "config not an object",
                "deep",
                "huge int",
            ]
        )
    )
    index, config = model_copy / "model_index.json", model_copy / "transformer" / "config.json"
    original_index, original_config = json.loads(index.read_text()), json.loads(config.read_text())
    if what == "index not an object":
        target, text = index, json.dumps(data.draw(_JSON.filter(lambda v: not isinstance(v, dict))))
    elif what == "index entry":
        name = data.draw(
            st.sampled_from(["transformer", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer"])
        )
        target, text = index, json.dumps({**original_index, name: data.draw(_NOT_A_PAIR)})
    elif what == "class name":
        value = data.draw(
            st.one_of(
                st.integers(), st.lists(st.integers(), max_size=2), _SAFE_TEXT.filter(lambda t: not t.isidentifier())
            )
        )
        target, text = index, json.dumps({**original_index, "_class_name": value})
    elif what == "config field":
        key, value = data.draw(_WRONG_FIELD)
        target, text = config, json.dumps({**original_config, key: value})
    elif what == "config not an object":
        target, text = config, json.dumps(data.draw(_JSON.filter(lambda v: not isinstance(v, dict))))
    elif what == "deep":
        target, text = (
            data.draw(st.sampled_from([index, config])),
            _deep(data.draw(st.integers(65, 20_000)), data.draw(st.sampled_from(["array", "object"]))),
        )
    else:
        target, text = (
            data.draw(st.sampled_from([index, config])),
            '{"num_layers": ' + "9" * data.draw(st.integers(4301, 6000)) + "}",
        )
    command = data.draw(
        st.sampled_from([["inspect", str(model_copy)], ["recommend", "-m", str(model_copy), "--gpu", "H100"]])
    )
    with replaced(target, text):
        line = assert_refused(command)
    assert line.startswith(f"advisor: error: {target}: "), line


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "abc"])
def test_bad_generations_are_refused_naming_the_flag(value):
    line = assert_refused(["recommend", "--gpu", "H100", "--generations", value])
    assert "--generations" in line and not line.startswith("advisor: error: argument "), line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gpu", "H100", "--os", "macos"], "linux, windows"),
        (["--os", "windows"], "--gpu NAME or --vram SIZE"),  # it describes another machine
    ],
)
def test_bad_operating_systems_are_refused_naming_the_flag(args, says):
    line = assert_refused(["recommend", *args])
    assert "--os" in line and says in line, line


def test_a_mistyped_option_gets_the_near_one():
    line = assert_refused(["recommend", "--modle", "flux-dev"])
    assert "no such option: --modle" in line and "did you mean --model?" in line, line


def test_an_unknown_model_lists_the_catalog_briefly():
    line = assert_refused(["estimate", "not-a-model-anyone-has"])
    # brief: an alias per model (about 20 characters each), never the hub ids
    assert "flux-dev" in line and "black-forest-labs" not in line and len(line) < 250 + 20 * len(catalog_names()), line
