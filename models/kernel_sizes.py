"""Every way a user can write ECA kernel sizes, turned into one tuple of ints.

The original took ``--ksize`` as ``type=list``: ``"3557"`` became four digits,
one per ResNet stage, and kernels of 10 or more could not be written. The same
digit form still works here, next to a comma form, a list, one integer for all
stages and ``"adaptive"`` (the paper's Eq. 12).
"""
import re
from typing import Sequence, Tuple, Union

__all__ = ["KernelSpec", "ADAPTIVE", "parse_kernel_sizes", "format_kernel_sizes"]

ADAPTIVE = "adaptive"
KernelSpec = Union[None, int, str, Sequence[Union[int, str]]]

# One signed integer ("-3", "+5"): a single value for every stage, so that a sign
# is reported as "not a positive odd integer" instead of as a wrong digit count.
_SIGNED_INTEGER = re.compile(r"[+-][0-9]+")


def _is_digits(text: str) -> bool:
    # str.isdigit() also accepts "²" and other Unicode digits that int() rejects.
    return text.isascii() and text.isdigit()


def _accepted_forms(count: int) -> str:
    example = "3557"[:count] if count <= 4 else "3" * count
    return (
        f"accepted forms: one digit per stage ({example!r}), comma-separated "
        f"({','.join(example)!r}), one odd integer for all {count} stages ('3'), or 'adaptive'"
    )


def _to_int(item: Union[int, str], spec: KernelSpec, count: int) -> int:
    if isinstance(item, bool):
        raise ValueError(f"invalid ECA kernel sizes {spec!r}: {item!r} is not an integer; {_accepted_forms(count)}")
    if isinstance(item, int):
        value = item
    else:
        text = str(item).strip()
        if not (_is_digits(text) or _SIGNED_INTEGER.fullmatch(text)):
            raise ValueError(f"invalid ECA kernel sizes {spec!r}: {item!r} is not an integer; {_accepted_forms(count)}")
        value = int(text)
    if value < 1 or value % 2 == 0:
        raise ValueError(
            f"invalid ECA kernel sizes {spec!r}: {value} is not a positive odd integer "
            f"(the kernel is centred on each channel); {_accepted_forms(count)}"
        )
    return value


def parse_kernel_sizes(spec: KernelSpec, count: int = 4) -> Union[Tuple[int, ...], str]:
    """Return ``count`` kernel sizes, or :data:`ADAPTIVE`, from any accepted form.

    ``count`` is the number of groups that share a kernel size: the 4 stages of
    a ResNet, or the 17 inverted residual blocks of MobileNetV2.

    Raises:
        ValueError: naming the bad value and listing the accepted forms.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() == ADAPTIVE:
            return ADAPTIVE
        if "," in text:
            items = [part for part in text.split(",")]
        elif (_is_digits(text) and len(text) == 1) or _SIGNED_INTEGER.fullmatch(text):
            items = [text] * count
        else:
            items = list(text)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        items = [spec] * count
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        # (bytes are a Sequence of ints: b"3557" would silently become kernels 51, 53, 53, 55.)
        items = list(spec)
        if len(items) == 1:
            items = items * count
    else:
        raise ValueError(f"invalid ECA kernel sizes {spec!r}; {_accepted_forms(count)}")

    if len(items) != count:
        # A letter among the digits ("35x7") is the mistake to name, not the count it throws off.
        for item in items:
            if isinstance(item, str) and item.strip():
                _to_int(item, spec, count)
        raise ValueError(
            f"invalid ECA kernel sizes {spec!r}: {len(items)} values for {count} stages; {_accepted_forms(count)}"
        )
    return tuple(_to_int(item, spec, count) for item in items)


def format_kernel_sizes(sizes: Sequence[int]) -> str:
    """Kernel sizes as ``--ksize`` takes them back: the original's digits for a ResNet's four stages ('3557'), else commas.

    Commas once a kernel has two digits, and for MobileNetV2's 17 blocks, whose
    run of digits ('11111111113333333') nobody could read. A network without
    ECA layers has none: 'none'.
    """
    if not sizes:
        return "none"
    digits = len(sizes) <= 4 and max(sizes) < 10
    return ("" if digits else ",").join(map(str, sizes))
