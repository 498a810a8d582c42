"""The shared request/image layer every handler stands on."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mmekit_common as common
from mmekit_common import RequestError
from tests.support import b64, image_bytes, random_image


def error_code(call, *args, **kwargs) -> str:
    with pytest.raises(RequestError) as raised:
        call(*args, **kwargs)
    assert raised.value.status == 400
    json.loads(raised.value.body())  # always a JSON body
    return raised.value.code


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header is rewritten to claim width x height."""
    data = bytearray(image_bytes(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


# -- request envelope ------------------------------------------------------------------------


def test_payload_from_bytes_str_and_dict_are_the_same():
    request = {"image": "abc", "gen_args": {"a": 1}}
    as_bytes = common.read_payload({"body": json.dumps(request).encode()})
    as_bytearray = common.read_payload({"body": bytearray(json.dumps(request).encode())})
    as_text = common.read_payload({"body": json.dumps(request)})
    as_dict = common.read_payload({"body": request})
    from_data_key = common.read_payload({"data": request})
    assert as_bytes == as_bytearray == as_text == as_dict == from_data_key == request


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2, 3]", "invalid_request"),
        (b'"a string"', "invalid_request"),
        ([1, 2], "invalid_request"),
        (None, "empty_request"),
    ],
)
def test_payload_that_is_not_a_json_object_is_a_400(body, code):
    assert error_code(common.read_payload, {"body": body}) == code


def test_json_field_accepts_object_or_string_and_nothing_else():
    assert common.read_json_object('{"a": 1}', "gen_args") == {"a": 1}
    assert common.read_json_object({"a": 1}, "gen_args") == {"a": 1}
    assert common.read_json_object(None, "gen_args") == {}
    assert error_code(common.read_json_object, "[1]", "gen_args") == "invalid_field"
    assert error_code(common.read_json_object, "{", "gen_args") == "invalid_field"
    assert error_code(common.read_json_object, 5, "gen_args") == "invalid_field"


# -- scalars ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "7", True, 1.5, [1]])
def test_int_fields_refuse_non_integers(value):
    assert error_code(common.read_int, {"n": value}, "n", 1, 0, 10) == "invalid_field"


def test_int_fields_check_range_and_take_integral_floats():
    assert common.read_int({"n": 3.0}, "n", 1, 0, 10) == 3
    assert common.read_int({}, "n", 4, 0, 10) == 4
    assert error_code(common.read_int, {"n": 11}, "n", 1, 0, 10) == "out_of_range"


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), "1.0", False])
def test_float_fields_refuse_nan_and_non_numbers(value):
    assert error_code(common.read_float, {"g": value}, "g", 1.0, 0.0, 30.0) == "invalid_field"


def test_text_fields_have_a_character_cap():
    assert common.read_text({"p": "hi"}, "p", 5) == "hi"
    assert error_code(common.read_text, {"p": "x" * 6}, "p", 5) == "too_long"
    assert error_code(common.read_text, {}, "p", 5, required=True) == "missing_field"
    assert error_code(common.read_text, {"p": 3}, "p", 5) == "invalid_field"


# -- base64 ----------------------------------------------------------------------------------


def test_base64_accepts_data_uri_and_line_breaks():
    payload = bytes(range(200))
    text = b64(payload)
    assert common.decode_base64(text, "image") == payload
    assert common.decode_base64("data:image/png;base64," + text, "image") == payload
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert common.decode_base64(wrapped, "image") == payload


@pytest.mark.parametrize("text", ["not base64!", "abc", "YWJj$ZA==", "", "   ", "Zm9v-_"])
def test_base64_is_strict(text):
    assert error_code(common.decode_base64, text, "image") == "invalid_base64"


def test_base64_must_be_a_string():
    assert error_code(common.decode_base64, 12, "image") == "invalid_field"


# -- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_allowed_formats_decode_to_rgb(image_format):
    image = common.decode_image(image_bytes(random_image(20, 10), image_format), "image")
    assert image.mode == "RGB" and image.size == (20, 10)


@pytest.mark.parametrize("image_format", ["BMP", "TIFF", "GIF"])
def test_other_formats_are_refused(image_format):
    data = image_bytes(
        random_image(8, 8).convert("P" if image_format == "GIF" else "RGB"), image_format
    )
    assert error_code(common.decode_image, data, "image") == "invalid_image"


def test_non_image_bytes_are_refused():
    assert error_code(common.decode_image, b"hello, not an image", "image") == "invalid_image"


def test_a_header_claiming_a_huge_size_is_refused_before_decoding():
    data = png_claiming_size(100_000, 100_000)
    assert len(data) < 100
    assert error_code(common.decode_image, data, "image") == "image_too_large"


def test_pixel_cap_is_configurable():
    data = image_bytes(random_image(64, 64))
    fits, too_small = common.ImageLimits(max_pixels=64 * 64), common.ImageLimits(max_pixels=64 * 63)
    assert common.decode_image(data, "image", fits).size == (64, 64)
    assert error_code(common.decode_image, data, "image", too_small) == "image_too_large"


def test_extreme_aspect_ratios_are_refused():
    assert common.decode_image(image_bytes(random_image(200, 10)), "image").size == (200, 10)
    data = image_bytes(random_image(2100, 1))
    assert error_code(common.decode_image, data, "image") == "image_aspect_ratio"


def test_limits_come_from_settings():
    limits = common.ImageLimits.from_settings({"max_image_pixels": 100, "max_aspect_ratio": 2})
    assert limits == common.ImageLimits(100, 2.0)


def test_truncated_png_is_refused():
    data = image_bytes(random_image(64, 64))
    assert error_code(common.decode_image, data[: len(data) // 2], "image") == "invalid_image"


def test_exif_orientation_is_applied():
    image = random_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert common.decode_image(buffer.getvalue(), "image").size == (20, 40)


def test_alpha_and_grayscale_inputs_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    gray = Image.new("L", (4, 4), 7)
    assert common.decode_image(image_bytes(rgba), "image").getpixel((0, 0)) == (10, 20, 30)
    assert common.decode_image(image_bytes(gray), "image").getpixel((0, 0)) == (7, 7, 7)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), JSON_VALUES))
def test_any_body_is_an_object_or_a_request_error(body):
    try:
        payload = common.read_payload({"body": body})
    except RequestError as error:
        assert error.status == 400
    else:
        assert isinstance(payload, dict)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_scalar_readers_accept_or_refuse_with_a_request_error(value):
    for read in (
        lambda: common.read_int({"v": value}, "v", 0, 0, 100),
        lambda: common.read_float({"v": value}, "v", 0.0, 0.0, 30.0),
        lambda: common.read_bool({"v": value}, "v", False),
        lambda: common.read_text({"v": value}, "v", 10),
        lambda: common.read_json_object(value, "v"),
        lambda: common.read_response_format({"format": value}),
    ):
        try:
            read()
        except RequestError as error:
            assert error.status == 400


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", '{"a": 1e999999}'],
)
def test_pathological_json_is_a_400(body):
    try:
        payload = common.read_payload({"body": body})
    except RequestError as error:
        assert error.code in ("invalid_json", "invalid_request")
    else:
        assert payload == {"a": float("inf")}  # Python reads 1e999999 as infinity


def test_huge_numbers_are_refused_not_crashed_on():
    assert error_code(common.read_float, {"g": 10**400}, "g", 1.0, 0.0, 30.0) == "invalid_field"
    assert error_code(common.read_int, {"n": 10**400}, "n", 1, 0, 10) == "out_of_range"


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_a_request_error(data):
    try:
        common.decode_image(data, "image")
    except RequestError as error:
        assert error.status == 400


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=400))
def test_any_truncation_of_a_png_is_a_request_error_or_a_full_image(cut):
    data = image_bytes(random_image(16, 16, seed=3))
    try:
        image = common.decode_image(data[:cut], "image")
    except RequestError:
        return
    assert image.size == (16, 16)


def test_mask_is_binarised_and_must_match_the_image_size():
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:4, 5:9] = 1  # any value > 0 counts
    payload = {"mask_image": b64(Image.fromarray(mask))}
    decoded = common.read_mask(payload, "mask_image", (20, 10))
    assert decoded.dtype == bool and decoded.sum() == 8
    assert error_code(common.read_mask, payload, "mask_image", (20, 11)) == "mask_size_mismatch"


def test_encode_image_round_trips_losslessly_as_png():
    image = random_image(9, 7)
    encoded = common.encode_image(image, "PNG")
    decoded = common.decode_image(common.decode_base64(encoded, "x"), "x")
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


# -- masks -----------------------------------------------------------------------------------


def reference_dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """cv2.dilate(mask, np.ones((k, k)), iterations=1) semantics, written out longhand."""
    anchor = k // 2
    height, width = mask.shape
    out = np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask), strict=True):
        top, left = y - (k - 1 - anchor), x - (k - 1 - anchor)
        out[max(top, 0) : min(top + k, height), max(left, 0) : min(left + k, width)] = True
    return out


@pytest.mark.parametrize("kernel_size", [2, 3, 4, 15])
def test_dilation_matches_opencv_semantics(kernel_size):
    rng = np.random.default_rng(kernel_size)
    mask = rng.random((30, 41)) > 0.97
    mask[0, 0] = mask[-1, -1] = True  # edges too
    assert np.array_equal(
        common.dilate_mask(mask, kernel_size), reference_dilate(mask, kernel_size)
    )


def test_dilation_by_zero_or_one_is_identity():
    mask = np.random.default_rng(0).random((8, 8)) > 0.5
    assert np.array_equal(common.dilate_mask(mask, 0), mask)
    assert np.array_equal(common.dilate_mask(mask, 1), mask)


def test_lru_cache_evicts_the_least_recently_used():
    cache = common.LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert len(cache) == 2
    disabled = common.LruCache(0)
    disabled.put("a", 1)
    assert disabled.get("a") is None


def test_error_status_is_never_413():
    assert RequestError("too_big", "smaller please", status=413).status == 400


def test_handler_settings_come_from_the_model_config(tmp_path):
    class FakeContext:
        system_properties = {"model_dir": str(tmp_path), "gpu_id": None}
        model_yaml_config = {"handler": {"weights_dir": "weights", "max_points": 3}}

    config = common.handler_context(FakeContext())
    assert config.setting("max_points") == 3
    assert config.device.type == "cpu"
    assert config.path("weights_dir", "x") == tmp_path / "weights"
    with pytest.raises(ValueError):
        common.HandlerContext(tmp_path, {"weights_dir": "../elsewhere"}, config.device).path(
            "weights_dir", "weights"
        )


# -- responses that fit ----------------------------------------------------------------------


def test_the_default_response_format_follows_the_input():
    assert common.response_formats(None, "JPEG") == ("JPEG",)
    assert common.response_formats(None, "PNG") == ("PNG", "JPEG")
    assert common.response_formats(None, "WEBP") == ("WEBP", "JPEG")
    assert common.response_formats("PNG", "JPEG") == ("PNG",)  # asked for: honoured


def test_fit_image_steps_down_to_a_jpeg_that_fits_and_says_which():
    noise = random_image(300, 200, seed=1)  # ~180 kB of PNG
    roomy = common.fit_image(noise, None, "PNG", 1_000_000)
    assert (roomy.image_format, roomy.format_name) == ("PNG", "png")
    tight = common.fit_image(noise, None, "PNG", 150_000)  # no room for the PNG
    assert (tight.image_format, tight.quality) == ("JPEG", 95)
    best = len(tight.base64) + common.RESPONSE_FIELDS_RESERVE
    tighter = common.fit_image(noise, None, "PNG", best - 4)  # q95 misses by a byte or so
    assert tighter.image_format == "JPEG" and tighter.quality == 90


def test_fit_image_refuses_with_advice_when_nothing_fits():
    noise = random_image(300, 200, seed=1)
    with pytest.raises(RequestError) as raised:
        common.fit_image(noise, "PNG", "PNG", 100_000)
    assert raised.value.code == "response_too_large"
    assert 'leave "format" out' in raised.value.message
    with pytest.raises(RequestError) as raised:
        common.fit_image(noise, None, "JPEG", 5_000)
    assert "send a smaller image" in raised.value.message


@pytest.mark.parametrize("size", [(64, 64), (1000, 700), (1024, 1024)])
def test_the_early_bound_is_below_any_real_jpeg(size):
    flat = Image.new("RGB", size, (128, 128, 128))  # the cheapest picture there is
    smallest = common.fit_image(flat, "JPEG", "JPEG", 10**9).base64
    floor = common.smallest_possible_response(*size)
    assert floor <= len(smallest) + common.RESPONSE_FIELDS_RESERVE
    common.refuse_unfittable(size, floor)  # at the floor: not refused
    assert error_code(common.refuse_unfittable, size, floor - 1) == "response_too_large"


@given(st.integers(0, 2**32 - 1), st.integers(2, 40))
@settings(max_examples=40, deadline=None)
def test_dilation_of_the_mask_box_only_equals_the_whole_images(seed, kernel_size):
    rng = np.random.default_rng(seed)
    mask = np.zeros((60, 80), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        y, x = rng.integers(0, 60), rng.integers(0, 80)
        mask[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
    assert np.array_equal(common.dilate_mask(mask, kernel_size), common._dilate(mask, kernel_size))


def test_settings_are_type_checked_at_load():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Knobs:
        count: int = 1
        ratio: float = 0.5

    assert common.read_settings(Knobs, {"count": 3, "ratio": 1, "other": "x"}) == Knobs(3, 1.0)
    for bad in ({"count": True}, {"count": 1.5}, {"ratio": "0.5"}, {"count": "3"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            common.read_settings(Knobs, bad)


def test_a_setting_without_a_default_must_be_in_the_config_and_unions_are_checked():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Knobs:
        steps: int
        mode: str | int = "best"

    with pytest.raises(ValueError, match="no setting steps under handler:"):
        common.read_settings(Knobs, {"mode": 1})
    assert common.read_settings(Knobs, {"steps": 3, "mode": 2}) == Knobs(3, 2)
    with pytest.raises(ValueError, match="expected str or int"):
        common.read_settings(Knobs, {"steps": 3, "mode": 1.5})


@pytest.mark.parametrize("model", ["sam", "lama", "sd"])
def test_an_unknown_setting_stops_the_model_at_load_naming_it(serve, model):
    with pytest.raises(ValueError, match="unknown setting.*max_dilate_kernal_size"):
        serve(model, max_dilate_kernal_size=9)  # a typo: silently ignored before


def test_every_knob_in_the_shipped_configs_is_read_by_its_handler():
    import yaml

    from scripts import PROJECT_ROOT

    handlers = {"sam": "sam_handler.SamHandler", "lama": "lama_handler.LamaHandler",
                "sd": "sd_handler.SdHandler"}  # fmt: skip
    for model, dotted in handlers.items():
        module, name = dotted.split(".")
        handler_class = getattr(__import__(module), name)
        config = PROJECT_ROOT / "configs" / model / "model-config.yaml"
        settings = yaml.safe_load(config.read_text())["handler"]
        common.refuse_unknown_settings(settings, handler_class.Settings)
        common.read_settings(handler_class.Settings, settings)  # every knob typed, none missing
