"""``check_image_size``: refusals that offer only what fits (a fixed ``available``, not this machine's)."""

from __future__ import annotations

import pytest

from dtop_export.errors import DToPError
from dtop_export.memory import check_image_size, inference_bytes, largest_size

GIB = 2**30


@pytest.mark.parametrize(
    "kwargs, offers, not_offered",
    [
        ({"size": 100_000}, "use --image-size {fits} or less", "--batch-size"),
        ({"size": 100_000, "batch": 4}, "use --image-size {fits} or less or a smaller --batch-size", "--scales"),
        ({"size": 512, "batch": 100_000_000}, "use a smaller --batch-size", "--image-size 0"),
        ({"size": 512, "scales": (1.0, 1e9)}, "use smaller --scales", "--image-size 0"),
        ({"size": 512, "batch": 100_000, "batch_option": "--batch"}, "or a smaller --batch", "--batch-size"),
        ({"size": 4096, "option": "--calib-sizes"}, "use --calib-sizes {fits} or less", "--image-size"),
    ],
    ids=["size", "size-and-batch", "batch-only", "scales-only", "bench-option-name", "other-option"],
)
def test_a_refusal_offers_only_values_that_fit(kwargs: dict, offers: str, not_offered: str) -> None:
    """Before, a batch that no size could fit was told "use --image-size 0 or less"."""
    available = 8 * GIB
    with pytest.raises(DToPError) as e:
        check_image_size(available=available, **kwargs)
    message = str(e.value)
    scales, batch = kwargs.get("scales", (1.0,)), kwargs.get("batch", 1)
    fits = largest_size(available, scales, batch, 16)
    assert offers.format(fits=fits) in message and not_offered not in message, message
    assert "GiB are available here" in message and "\n" not in message
    if fits >= 16:  # what it offers does fit, and the next size up does not
        assert inference_bytes(fits, scales, batch, 16) <= available < inference_bytes(fits + 16, scales, batch, 16)


def test_nothing_fits_says_so() -> None:
    with pytest.raises(DToPError, match="not even the smallest input fits: free memory, or use a larger machine"):
        check_image_size(512, available=1)
