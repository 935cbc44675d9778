import pytest

from advisor.errors import UsageError
from advisor.units import format_size, parse_size


GIB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GB", 12 * GIB),
        ("12 GiB", 12 * GIB),
        ("12gb", 12 * GIB),
        ("12G", 12 * GIB),
        ("12000MB", 12000 * 2**20),
        ("1.5T", int(1.5 * 2**40)),
        ("1.5TB", int(1.5 * 2**40)),
        ("512K", 512 * 1024),
        ("1048576", 2**20),  # a bare number is bytes from 1 MiB up
        ("123456B", 123456),
        (" 24 GB ", 24 * GIB),
        ("0", 0),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_the_documented_forms(text, expected):
    assert parse_size(text) == expected


def test_gb_is_binary_like_nvidia_smi_and_diffusers():
    # nvidia-smi reports an RTX 4090 as 24564MiB: that is just under "24 GB" in our units.
    assert parse_size("24564MiB") < parse_size("24GB") < parse_size("24564MiB") + 2**30
    assert parse_size("1GB") == parse_size("1GiB") == 1024**3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("twelve", "'twelve' is not a size"),
        ("-3GB", "'-3GB' is negative"),
        ("12XB", "'12XB' is not a size"),
        ("", "the value is empty"),
        ("   ", "the value is empty"),
        ("12 G B", "is not a size"),
        ("1e400G", "too large"),
    ],
)
def test_bad_sizes_name_the_flag_in_one_line(text, fragment):
    with pytest.raises(UsageError) as excinfo:
        parse_size(text, name="--budget")
    message = str(excinfo.value)
    assert message.startswith("--budget: ")
    assert fragment in message
    assert "12GB" in message  # shows what would be valid
    assert "\n" not in message


def test_negative_and_bool_ints_are_refused():
    with pytest.raises(UsageError, match="negative"):
        parse_size(-1, name="--vram")
    with pytest.raises(UsageError, match="expected a size"):
        parse_size(True, name="--vram")


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KB"), (16047697920, "14.95 GB"), (3 * 2**40, "3.00 TB"), (None, "-")],
)
def test_format_size(num_bytes, text):
    assert format_size(num_bytes) == text


def test_format_then_parse_round_trips_within_rounding():
    for value in (5 * 2**20, 14 * GIB + 123456789, 2**41):
        assert abs(parse_size(format_size(value)) - value) / value < 0.005


@pytest.mark.parametrize("text", ["12", "24", "512", "0.5"])
def test_a_bare_small_number_is_a_forgotten_unit(text):
    with pytest.raises(
        UsageError, match=f"--vram: '{text}' has no unit and is read as bytes; did you mean {text}GB\\?"
    ):
        parse_size(text, name="--vram")


@pytest.mark.parametrize("text", ["2000PB", "1e400G", str(2**60 + 2**40)])
def test_a_size_over_the_limit_says_the_limit(text):
    """The limit is documented (docs/cli.md: at most 2^60 bytes); the refusal must say it, not only "too large"."""
    with pytest.raises(UsageError) as excinfo:
        parse_size(text, name="--vram")
    assert str(excinfo.value).startswith(f"--vram: {text!r} is too large") and "2^60 bytes" in str(excinfo.value)
    assert parse_size("1024PB") == 2**60  # the limit itself is a size
