"""Tests for diffsplit.contract.buckets: the automatic bucket set, parsing the flag, assignment."""

from __future__ import annotations

import math

import pytest

from diffsplit.contract.buckets import assign_bucket, auto_buckets, parse_buckets
from diffsplit.errors import UserError

MEGA = 1024 * 1024
FLAG = "--resolution_buckets"


@pytest.fixture(scope="module")
def mega() -> list[tuple[int, int]]:
    return auto_buckets(MEGA, 16, 16)


# -- auto_buckets ------------------------------------------------------------------------------------------
def test_auto_buckets_respect_area_multiple_side_and_aspect(mega: list[tuple[int, int]]) -> None:
    assert len(mega) == len(set(mega))
    for width, height in mega:
        assert width * height <= MEGA
        assert width % 16 == 0 and height % 16 == 0
        assert width >= 16 and height >= 16
        assert 1 / 4 <= width / height <= 4


def test_auto_buckets_contain_the_square_and_both_orientations(mega: list[tuple[int, int]]) -> None:
    assert (1024, 1024) in mega
    assert mega[0][0] * mega[0][1] == MEGA  # the largest area comes first
    present = set(mega)
    assert all((h, w) in present for w, h in mega)
    # The extremes of the aspect range are reached at the top level.
    assert (2048, 512) in present and (512, 2048) in present


def test_auto_buckets_have_several_area_levels_down_to_small_sides(mega: list[tuple[int, int]]) -> None:
    squares = {w for w, h in mega if w == h}
    # 1024 at level 0, then 720 (floor of sqrt(2**19) to 16), 512, ... down to 32 (= 2 * multiple).
    assert {1024, 720, 512, 32} <= squares
    assert min(w * h for w, h in mega) < MEGA // 256
    # No area level below the last whose square side reaches 2 * multiple: nothing near 16x16.
    assert (16, 16) not in squares


def test_auto_buckets_are_sorted_by_area_then_aspect(mega: list[tuple[int, int]]) -> None:
    keys = [(-w * h, w / h) for w, h in mega]
    assert keys == sorted(keys)


def test_auto_buckets_are_deterministic() -> None:
    assert auto_buckets(MEGA, 16, 16) == auto_buckets(MEGA, 16, 16)
    assert auto_buckets(768 * 768, 16, 64) == auto_buckets(768 * 768, 16, 64)


def test_auto_buckets_honour_max_ratio_and_min_side() -> None:
    narrow = auto_buckets(MEGA, 16, 16, max_ratio=2.0)
    assert narrow and all(1 / 2 <= w / h <= 2 for w, h in narrow)
    assert (2048, 512) not in narrow
    tall = auto_buckets(MEGA, 64, 100)
    assert tall and all(w % 64 == 0 and h % 64 == 0 and min(w, h) >= 100 for w, h in tall)


def test_auto_buckets_for_a_tiny_policy() -> None:
    tiny = auto_buckets(64 * 64, 16, 16)
    assert (64, 64) in tiny and (32, 32) in tiny
    for width, height in tiny:
        assert width * height <= 64 * 64 and width % 16 == 0 and height % 16 == 0
        assert min(width, height) >= 16 and 1 / 4 <= width / height <= 4
    # A budget of one minimal square still gives that square.
    assert auto_buckets(16 * 16, 16, 16) == [(16, 16)]


def test_auto_buckets_reject_a_budget_below_the_smallest_square() -> None:
    with pytest.raises(UserError, match="--max_pixels 100 "):
        auto_buckets(100, 16, 16)


# -- parse_buckets -----------------------------------------------------------------------------------------
def test_parse_buckets_keeps_order_and_accepts_spaces_and_capital_x() -> None:
    assert parse_buckets("1024x1024,832x1216", 16, 16) == [(1024, 1024), (832, 1216)]
    assert parse_buckets(" 1216X832 , 1024x1024 ,", 16, 16) == [(1216, 832), (1024, 1024)]


@pytest.mark.parametrize(
    ("text", "item", "why"),
    [
        ("1024x1024,big", "'big'", "WIDTHxHEIGHT"),
        ("1024x1024,1024", "'1024'", "WIDTHxHEIGHT"),
        ("1024x1024x3", "'1024x1024x3'", "WIDTHxHEIGHT"),
        ("-16x32", "'-16x32'", "WIDTHxHEIGHT"),
        ("1.5x32", "'1.5x32'", "WIDTHxHEIGHT"),
        ("1024x1000", "'1024x1000'", "height 1000 is not a multiple of 16"),
        ("1000x1024", "'1000x1024'", "width 1000 is not a multiple of 16"),
        ("1024x0", "'1024x0'", "height 0 is below the smallest side 16"),
        ("1024x1024,832x1216,1024X1024", "'1024X1024'", "repeats the size 1024x1024"),
        ("", "''", "names no size"),
        (" , ", "' , '", "names no size"),
    ],
)
def test_parse_buckets_errors_name_the_flag_and_the_item(text: str, item: str, why: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_buckets(text, 16, 16)
    message = str(caught.value)
    assert message.startswith(FLAG) and item in message and why in message
    assert "\n" not in message


def test_parse_buckets_checks_the_given_multiple_and_min_side_and_flag() -> None:
    with pytest.raises(UserError, match=r"--val_buckets item '96x96': width 96 is not a multiple of 64"):
        parse_buckets("128x128,96x96", 64, 64, flag="--val_buckets")
    with pytest.raises(UserError, match=r"'64x256': width 64 is below the smallest side 128"):
        parse_buckets("64x256", 64, 128)
    with pytest.raises(UserError, match=r"item 'a\\nb'"):  # a newline stays escaped: one line
        parse_buckets("a\nb", 16, 16)


# -- assign_bucket -----------------------------------------------------------------------------------------
def test_assign_bucket_picks_the_nearest_aspect_among_equal_areas() -> None:
    buckets = [(1024, 1024), (832, 1216), (1216, 832), (1408, 704), (704, 1408)]
    assert assign_bucket(3000, 2000, buckets) == (1216, 832)
    assert assign_bucket(2000, 3000, buckets) == (832, 1216)
    assert assign_bucket(2000, 2100, buckets) == (1024, 1024)
    assert assign_bucket(4000, 1900, buckets) == (1408, 704)
    # The order of the list does not matter.
    assert assign_bucket(3000, 2000, buckets[::-1]) == (1216, 832)


def test_assign_bucket_never_upscales_either_side() -> None:
    buckets = [(1024, 1024), (1216, 832), (512, 512), (608, 416)]
    # 1300x800 is wide enough for 1216 but not tall enough for 832: the smaller wide bucket.
    assert assign_bucket(1300, 800, buckets) == (608, 416)
    for width, height in [(1300, 800), (900, 2000), (1023, 1023), (520, 5000), (5000, 520)]:
        chosen = assign_bucket(width, height, buckets)
        assert chosen is not None and chosen[0] <= width and chosen[1] <= height


def test_assign_bucket_prefers_the_larger_area_at_equal_aspect() -> None:
    buckets = [(512, 512), (1024, 1024), (768, 768)]
    assert assign_bucket(2000, 2000, buckets) == (1024, 1024)
    assert assign_bucket(1000, 900, buckets) == (768, 768)
    assert assign_bucket(1024, 1024, buckets) == (1024, 1024)  # an exact fit counts as covered


def test_assign_bucket_returns_none_below_every_bucket() -> None:
    buckets = [(512, 512), (768, 512), (512, 768)]
    assert assign_bucket(500, 2000, buckets) is None
    assert assign_bucket(2000, 500, buckets) is None
    assert assign_bucket(16, 16, buckets) is None
    assert assign_bucket(1000, 1000, []) is None


def test_a_photo_under_auto_buckets_keeps_its_aspect_and_resolution(mega: list[tuple[int, int]]) -> None:
    for width, height in [(4000, 3000), (3000, 4000)]:
        bw, bh = assign_bucket(width, height, mega)
        assert abs(math.log(bw / bh) - math.log(width / height)) < 0.02
        assert bw * bh >= 0.98 * MEGA
    # By aspect alone the exactly 4:3 bucket of a lower level (832x624, half the area) would win.
    assert (832, 624) in mega and assign_bucket(4000, 3000, mega) != (832, 624)


def test_small_images_find_a_smaller_level_of_auto_buckets(mega: list[tuple[int, int]]) -> None:
    for width, height in [(600, 400), (300, 300), (100, 380), (40, 40)]:
        bw, bh = assign_bucket(width, height, mega)
        assert bw <= width and bh <= height
        # The crop keeps most of the image, and the bucket uses a fair share of its pixels.
        assert abs(math.log(bw / bh) - math.log(width / height)) < math.log(1.2)
        assert bw * bh >= 0.4 * width * height
    assert assign_bucket(20, 2000, mega) == (16, 64)  # the narrowest bucket, at the widest allowed aspect
    assert assign_bucket(10, 2000, mega) is None  # narrower than min_side
