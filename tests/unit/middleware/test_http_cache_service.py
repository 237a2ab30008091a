"""HTTP cache protocol pieces: header parsers (also under hypothesis), ETags, entry layout, storage."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
from typing import Any
from urllib.parse import quote_plus, unquote_to_bytes

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.errors import CodecError, ConfigurationError, RedisCommandError
from app.services.http_cache import (
    EntityTag,
    HttpResponseCache,
    cache_control_for_private,
    compute_etag,
    credential_digest,
    decode_entry,
    encode_entry,
    format_http_date,
    if_none_match_matches,
    normalize_host,
    normalize_path,
    normalize_query,
    parse_cache_control,
    parse_entity_tag,
    parse_http_date,
    parse_if_none_match,
    parse_vary,
    url_digest,
    url_digest_for,
    variant_digest,
)
from app.testing.slots import slot_checking_fake_redis

header_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=200
) | st.from_regex(r'[ \t]*(W/)?"?[a-z0-9=,;"*\\ ]{0,40}', fullmatch=True)

# -- Cache-Control ------------------------------------------------------------


def test_cache_control_directives_arguments_and_case() -> None:
    cc = parse_cache_control('Public, MAX-AGE=60, s-maxage="120", no-cache="Set-Cookie, X-A"')
    assert dict(cc) == {
        "public": None,
        "max-age": "60",
        "s-maxage": "120",
        "no-cache": "Set-Cookie, X-A",
    }
    assert cc.seconds("max-age") == 60
    assert cc.seconds("s-maxage") == 120
    assert cc.seconds("stale-if-error") is None


def test_cache_control_malformed_delta_reads_as_zero_so_nothing_stays_fresh() -> None:
    cc = parse_cache_control("max-age=abc, s-maxage=-5, stale-while-revalidate")
    assert cc.seconds("max-age") == 0
    assert cc.seconds("s-maxage") == 0
    assert cc.seconds("stale-while-revalidate") == 0


def test_cache_control_repeated_delta_keeps_the_smaller_and_huge_values_are_capped() -> None:
    assert parse_cache_control("max-age=600, max-age=5").seconds("max-age") == 5
    assert parse_cache_control("max-age=5, max-age=600").seconds("max-age") == 5
    assert parse_cache_control("max-age=" + "9" * 5000).seconds("max-age") == 2_147_483_648


def test_cache_control_skips_garbage_members() -> None:
    cc = parse_cache_control(',,, =5, "quoted"=1, no store, max-age=10,,')
    assert dict(cc) == {"max-age": "10"}
    assert dict(parse_cache_control(None)) == {}
    assert dict(parse_cache_control("")) == {}


@given(header_text)
def test_cache_control_parser_never_raises(value: str) -> None:
    cc = parse_cache_control(value)
    for name in cc:
        seconds = cc.seconds(name)
        assert seconds is None or 0 <= seconds <= 2_147_483_648


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True),
        st.none() | st.integers(0, 10**6).map(str) | st.from_regex(r"[ -~]{0,10}", fullmatch=True),
        max_size=6,
    )
)
def test_cache_control_round_trips_rendered_directives(directives: dict[str, str | None]) -> None:
    def render(name: str, arg: str | None) -> str:
        if arg is None:
            return name
        escaped = arg.replace("\\", "\\\\").replace('"', '\\"')
        return f'{name}="{escaped}"'

    value = ", ".join(render(k, v) for k, v in directives.items())
    assert dict(parse_cache_control(value)) == directives


def test_private_rewrite_drops_shared_directives_and_keeps_the_rest() -> None:
    assert cache_control_for_private("public, max-age=60, s-maxage=600") == "private, max-age=60"
    assert cache_control_for_private("max-age=5, private") == "max-age=5, private"
    assert (
        cache_control_for_private('max-age=5, no-cache="a, b"')
        == 'private, max-age=5, no-cache="a, b"'
    )


# -- entity tags and If-None-Match --------------------------------------------


def test_entity_tags_parse_strong_weak_and_reject_unquoted() -> None:
    assert parse_entity_tag('"abc"') == EntityTag(False, '"abc"')
    assert parse_entity_tag(' W/"abc" ') == EntityTag(True, '"abc"')
    assert str(EntityTag(True, '"abc"')) == 'W/"abc"'
    assert parse_entity_tag("abc") is None
    assert parse_entity_tag('"a"b"') is None
    assert parse_entity_tag('"') is None


def test_if_none_match_lists_star_and_commas_inside_tags() -> None:
    assert parse_if_none_match("*") == "*"
    assert parse_if_none_match(' "a", W/"b" ,"c,d"') == [
        EntityTag(False, '"a"'),
        EntityTag(True, '"b"'),
        EntityTag(False, '"c,d"'),
    ]
    # a * inside a list and unquoted members are skipped: they can only cost a 304
    assert parse_if_none_match('"a", *, bogus, W/x') == [EntityTag(False, '"a"')]


def test_weak_comparison_for_if_none_match() -> None:
    assert if_none_match_matches('"x"', '"x"')
    assert if_none_match_matches('W/"x"', '"x"')
    assert if_none_match_matches('"x"', 'W/"x"')
    assert if_none_match_matches('"a", W/"x", "b"', '"x"')
    assert if_none_match_matches("*", '"anything"')
    assert not if_none_match_matches('"y"', '"x"')
    assert not if_none_match_matches("x", '"x"')
    assert not if_none_match_matches('"x', '"x"')
    assert not if_none_match_matches("", '"x"')


@given(
    st.lists(st.tuples(st.booleans(), st.from_regex(r"[!#-~]{0,20}", fullmatch=True)), max_size=8)
)
def test_if_none_match_round_trips_any_list_of_valid_tags(tags: list[tuple[bool, str]]) -> None:
    value = ", ".join(("W/" if weak else "") + f'"{opaque}"' for weak, opaque in tags)
    parsed = parse_if_none_match(value)
    assert parsed == [EntityTag(weak, f'"{opaque}"') for weak, opaque in tags]
    for _weak, opaque in tags:
        assert if_none_match_matches(value, f'"{opaque}"')


@given(header_text, header_text)
def test_if_none_match_never_raises(value: str, current: str) -> None:
    assert isinstance(if_none_match_matches(value, current), bool)
    parse_if_none_match(value)


# -- Vary, dates, queries -----------------------------------------------------


def test_vary_names_are_sorted_lower_case_and_unique() -> None:
    assert parse_vary(["Accept-Language, accept", "ACCEPT-language"]) == (
        "accept",
        "accept-language",
    )
    assert parse_vary([]) == ()
    assert parse_vary([" , "]) == ()


def test_vary_star_or_garbage_means_never_store() -> None:
    assert parse_vary(["Accept, *"]) is None
    assert parse_vary(["Accept Language"]) is None
    assert parse_vary(['"x"']) is None


@given(st.lists(header_text, max_size=3))
def test_vary_parser_never_raises(values: list[str]) -> None:
    parsed = parse_vary(values)
    assert parsed is None or list(parsed) == sorted(set(parsed))


def test_http_dates_in_all_three_formats() -> None:
    expected = 784111777
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == expected
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == expected
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == expected
    assert format_http_date(expected) == "Sun, 06 Nov 1994 08:49:37 GMT"
    for bad in ("", "yesterday", "0", "Sun, 99 Nov 1994 08:49:37 GMT", "x" * 500):
        assert parse_http_date(bad) is None


@given(header_text)
def test_http_date_parser_never_raises(value: str) -> None:
    result = parse_http_date(value)
    assert result is None or isinstance(result, int)


@given(st.integers(0, 2**33))
def test_http_dates_round_trip(seconds: int) -> None:
    assert parse_http_date(format_http_date(seconds)) == seconds


names = st.text(alphabet="abcdefgh_ é%+", min_size=1, max_size=4)


@given(st.lists(st.tuples(names, st.text(alphabet="xyz0 ", max_size=3)), max_size=6), st.randoms())
def test_query_normalisation_ignores_order_of_different_names_only(
    pairs: list[tuple[str, str]], rnd: Any
) -> None:
    encoded = [f"{quote_plus(k)}={quote_plus(v)}".encode() for k, v in pairs]
    shuffled = list(encoded)
    rnd.shuffle(shuffled)
    same_names_in_order = all(
        [p for p in encoded if p.split(b"=")[0] == name]
        == [p for p in shuffled if p.split(b"=")[0] == name]
        for name in {p.split(b"=")[0] for p in encoded}
    )
    a, b = normalize_query(b"&".join(encoded)), normalize_query(b"&".join(shuffled))
    assert (a == b) == same_names_in_order
    assert normalize_query(a) == a


def test_query_normalisation_examples() -> None:
    assert normalize_query(b"b=2&a=1") == normalize_query(b"a=1&b=2") == b"a=1&b=2"
    assert normalize_query(b"a=2&a=1") != normalize_query(b"a=1&a=2")
    # two spellings the app reads as one name keep their relative order
    assert normalize_query(b"a=1&%61=2") != normalize_query(b"%61=2&a=1")
    assert normalize_query(b"&&a=1&&") == b"a=1"
    assert normalize_query(b"") == b""


def test_url_digests_normalise_host_port_and_query_but_not_path() -> None:
    base = url_digest("http", "Example.com:80", b"/items/1", b"b=2&a=1")
    assert base == url_digest("http", "example.com", b"/items/1", b"a=1&b=2")
    assert base == url_digest_for("http://EXAMPLE.com/items/1?a=1&b=2")
    assert base != url_digest("https", "example.com", b"/items/1", b"a=1&b=2")
    assert base != url_digest("http", "example.com:8080", b"/items/1", b"a=1&b=2")
    assert base != url_digest("http", "example.com", b"/items/1/", b"a=1&b=2")
    assert base != url_digest("http", "example.org", b"/items/1", b"a=1&b=2")
    assert normalize_host("https", "A.b:443") == "a.b"
    with pytest.raises(ValueError, match="absolute"):
        url_digest_for("/items/1")


@pytest.mark.parametrize(
    ("raw", "kept", "dots_removed"),
    [
        (b"/items/1", b"/items/1", b"/items/1"),
        (b"/%7Euser/%41%62", b"/~user/Ab", b"/~user/Ab"),
        (b"/a%2fb", b"/a%2Fb", b"/a%2Fb"),
        (b"/items/./1", None, b"/items/1"),
        (b"/x/../items/1", None, b"/items/1"),
        (b"/x/%2E%2E/items/1", None, b"/items/1"),
        (b"/../../items/1", None, b"/items/1"),
        (b"/items/1/..", None, b"/items/"),
        (b"/%", b"/%25", b"/%25"),
        (b"/%zz", b"/%25zz", b"/%25zz"),
        (b"/%%41a", b"/%25Aa", b"/%25Aa"),
    ],
)
def test_path_normalisation(raw: bytes, kept: bytes | None, dots_removed: bytes) -> None:
    assert normalize_path(raw) == kept
    assert normalize_path(raw, remove_dots=True) == dots_removed


def test_every_spelling_of_a_url_has_one_digest() -> None:
    base = url_digest_for("http://example.com/items/a~1")
    assert base == url_digest_for("http://example.com/items/%61%7E1")
    assert base == url_digest_for("http://example.com/x/../items/./a~1")


def test_variant_and_caller_digests_are_injective_over_their_parts() -> None:
    digests = {
        variant_digest("accept", "", [b"a"]),
        variant_digest("accept", "", [b"b"]),
        variant_digest("accept", "c1", [b"a"]),
        variant_digest("accept,x", "", [b"a", b""]),
        variant_digest("accept,x", "", [b"", b"a"]),
        variant_digest("", "", []),
    }
    assert len(digests) == 6
    one = credential_digest(b"k", [(b"authorization", b"Bearer a")])
    assert one == credential_digest(b"k", [(b"authorization", b"Bearer a")])
    assert one != credential_digest(b"k2", [(b"authorization", b"Bearer a")])
    assert one != credential_digest(b"k", [(b"cookie", b"Bearer a")])


# -- ETags and the entry layout -----------------------------------------------


def test_etags_are_strong_quoted_and_depend_on_representation() -> None:
    tag = compute_etag(b'{"a":1}', b"application/json")
    assert tag == '"bTsFxrgcD8WTpSekz_TjFQ"'  # fixed: stable across processes and releases
    assert parse_entity_tag(tag) == EntityTag(False, tag)
    assert tag != compute_etag(b'{"a":2}', b"application/json")
    assert tag != compute_etag(b'{"a":1}', b"text/plain")
    assert tag != compute_etag(b'{"a":1}', b"application/json", b"gzip")


@given(
    st.integers(100, 599),
    st.lists(st.tuples(st.binary(min_size=1, max_size=30), st.binary(max_size=300)), max_size=8),
    st.binary(max_size=20_000) | st.just(b"abc" * 5000),
    st.booleans(),
    st.sampled_from([0, 10, 4096]),
)
@settings(max_examples=60)
def test_entries_round_trip(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    synthesized: bool,
    threshold: int,
) -> None:
    blob = encode_entry(
        status, headers, body, synthesized_lm=synthesized, compress_threshold=threshold
    )
    assert decode_entry(blob) == (status, tuple(headers), body, synthesized)


def test_compressible_bodies_are_compressed_and_capped_on_the_way_back() -> None:
    body = b"a" * 100_000
    blob = encode_entry(200, [], body, compress_threshold=1024)
    assert len(blob) < 2000
    assert decode_entry(blob)[2] == body
    with pytest.raises(CodecError):
        decode_entry(blob, max_body_size=50_000)


@given(st.binary(max_size=200))
def test_corrupt_blobs_raise_codec_error_only(blob: bytes) -> None:
    with contextlib.suppress(CodecError):  # anything else (IndexError, ...) fails the test
        decode_entry(blob)


def test_truncated_and_oversized_entries() -> None:
    blob = encode_entry(200, [(b"content-type", b"text/plain")], b"body")
    for cut in range(1, 20):
        with pytest.raises(CodecError):
            decode_entry(blob[:cut])
    with pytest.raises(CodecError, match="too long"):
        encode_entry(200, [(b"x", b"v" * 70_000)], b"")


# -- storage --------------------------------------------------------------------


def _variant(spec: str) -> str:
    return variant_digest(spec, "", [])


async def _store(cache: HttpResponseCache, url: str, generation: str, body: bytes) -> Any:
    return await cache.store(
        url,
        _variant(""),
        spec="",
        generation=generation,
        status=200,
        headers=[(b"content-type", b"text/plain")],
        body=body,
        etag=compute_etag(body),
        last_modified=None,
        fresh_ms=60_000,
    )


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decode_responses"])
async def test_store_then_lookup_in_one_round_trip(decode: bool) -> None:
    client = slot_checking_fake_redis(server=fakeredis.FakeServer(), decode_responses=decode)
    try:
        cache = HttpResponseCache(client)
        url = url_digest_for("http://t/x")
        first = await cache.lookup(url, _variant)
        assert first is not None and first.entry is None and first.generation == ""
        stored = await _store(cache, url, first.generation, b"\x00\xffbinary")
        assert stored is not None and stored.stored and stored.last_modified > 0
        commands: list[Any] = []
        execute: Any = client.execute_command

        async def counting(*args: Any, **kwargs: Any) -> Any:
            commands.append(args[0])
            return await execute(*args, **kwargs)

        client.execute_command = counting  # type: ignore[method-assign]
        found = await cache.lookup(url, _variant)
        assert commands == ["EVALSHA"]
        assert found is not None and found.entry is not None
        assert found.entry.body == b"\x00\xffbinary"
        assert found.entry.headers == ((b"content-type", b"text/plain"),)
        assert found.entry.etag == compute_etag(b"\x00\xffbinary")
        assert found.entry.stored_at_ms == stored.stored_at_ms
        assert found.entry.last_modified == stored.last_modified and found.entry.synthesized_lm
        # every key carries a TTL and one hash tag
        keys = [k if isinstance(k, str) else k.decode() async for k in client.scan_iter("*")]
        assert len(keys) == 2 and all([await client.pttl(k) > 0 for k in keys])
        assert len({k.split("{")[1].split("}")[0] for k in keys}) == 1
    finally:
        await client.aclose()


async def test_invalidation_drops_every_variant_and_refuses_older_computations(
    fake_redis: Any,
) -> None:
    cache = HttpResponseCache(fake_redis)
    url = url_digest_for("http://t/x")
    before = await cache.lookup(url, _variant)
    assert before is not None
    assert (await _store(cache, url, before.generation, b"v1")).stored
    seen = await cache.lookup(url, _variant)  # a request computing v1 again...
    assert seen is not None and seen.entry is not None
    assert await cache.invalidate("http://t/x") is True
    assert await cache.invalidate("http://t/x") is False  # nothing stored since
    after = await cache.lookup(url, _variant)
    assert after is not None and after.entry is None
    late = await _store(cache, url, seen.generation, b"v1-late")  # ...finishes after it
    assert late is not None and not late.stored
    assert cache.stats.refused == 1
    fresh = await _store(cache, url, after.generation, b"v2")
    assert fresh is not None and fresh.stored
    found = await cache.lookup(url, _variant)
    assert found is not None and found.entry is not None and found.entry.body == b"v2"
    assert await fake_redis.pttl(cache._meta(url)) > 0


async def test_synthesized_last_modified_is_kept_for_the_same_body_and_never_reused(
    fake_redis: Any,
) -> None:
    cache = HttpResponseCache(fake_redis)
    url = url_digest_for("http://t/x")
    gen = ""
    first = await _store(cache, url, gen, b"same")
    meta = await cache.lookup(url, _variant)
    assert meta is not None
    again = await _store(cache, url, meta.generation, b"same")
    assert again.last_modified == first.last_modified
    # a different body in the same second gets no Last-Modified at all, so an
    # If-Modified-Since copied from the first version can never match it
    other = await _store(cache, url, meta.generation, b"other")
    assert other.stored
    assert other.last_modified in (0, first.last_modified + 1, first.last_modified + 2)
    assert other.last_modified != first.last_modified


async def test_corrupt_entry_reads_as_a_miss(fake_redis: Any) -> None:
    cache = HttpResponseCache(fake_redis)
    url = url_digest_for("http://t/x")
    assert (await _store(cache, url, "", b"v1")).stored
    await fake_redis.hset(cache._entry(url, _variant("")), "d", b"garbage")
    found = await cache.lookup(url, _variant)
    assert found is not None and found.entry is None
    assert cache.stats.errors == 1


async def test_vary_spec_change_costs_one_more_lookup_only(fake_redis: Any) -> None:
    cache = HttpResponseCache(fake_redis)
    url = url_digest_for("http://t/x")
    calls: list[str] = []

    def variant(spec: str) -> str:
        calls.append(spec)
        return variant_digest(spec, "", [b"fr"] if spec else [])

    await cache.store(
        url,
        variant("accept-language"),
        spec="accept-language",
        generation="",
        status=200,
        headers=[],
        body=b"bonjour",
        etag='"b"',
        last_modified=0,
        fresh_ms=10_000,
    )
    calls.clear()
    found = await cache.lookup(url, variant, "")
    assert found is not None and found.entry is not None and found.entry.body == b"bonjour"
    assert calls == ["", "accept-language"] and found.spec == "accept-language"
    assert found.entry.last_modified == 0 and not found.entry.synthesized_lm


@pytest.mark.parametrize(
    "combo", [c for c in itertools.product([0, 5_000], [0, 30_000], [0, 60_000]) if any(c)]
)
async def test_entry_ttl_is_fresh_plus_the_longer_stale_window(
    fake_redis: Any, combo: tuple[int, int, int]
) -> None:
    fresh, swr, sie = combo
    cache = HttpResponseCache(fake_redis)
    url = url_digest_for("http://t/x")
    await cache.store(
        url, _variant(""), spec="", generation="", status=200, headers=[], body=b"",
        etag='"e"', last_modified=0, fresh_ms=fresh, swr_ms=swr, sie_ms=sie,
    )  # fmt: skip
    ttl = await fake_redis.pttl(cache._entry(url, _variant("")))
    assert fresh + max(swr, sie) - 1000 < ttl <= fresh + max(swr, sie)


async def test_clear_removes_this_namespace_only(fake_redis: Any) -> None:
    cache = HttpResponseCache(fake_redis)
    other = HttpResponseCache(fake_redis, namespace="httpcache2")
    for c in (cache, other):
        url = url_digest_for("http://t/x")
        assert (await _store(c, url, "", b"v")).stored
    await fake_redis.set("unrelated", b"1")
    assert await cache.clear() == 2
    url = url_digest_for("http://t/x")
    found = await other.lookup(url, _variant)
    assert found is not None and found.entry is not None
    assert await fake_redis.get("unrelated") == b"1"


async def test_entries_written_by_either_client_kind_never_break_the_other() -> None:
    server = fakeredis.FakeServer()
    binary = slot_checking_fake_redis(server=server)
    text = slot_checking_fake_redis(server=server, decode_responses=True)
    try:
        url_a, url_b = url_digest_for("http://t/a"), url_digest_for("http://t/b")
        assert (await _store(HttpResponseCache(text), url_a, "", b"from text")).stored
        found = await HttpResponseCache(binary).lookup(url_a, _variant)
        assert found is not None and found.entry is not None and found.entry.body == b"from text"
        assert (await _store(HttpResponseCache(binary), url_b, "", b"\xff binary")).stored
        reader = HttpResponseCache(text)
        # a binary entry cannot be decoded to text by the client: fail open, never raise
        assert await reader.lookup(url_b, _variant) is None
        assert reader.stats.errors == 1
    finally:
        await binary.aclose()
        await text.aclose()


async def test_a_refused_command_fails_open_and_is_logged_once_without_redis_text(
    fake_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = HttpResponseCache(fake_redis)
    url = url_digest_for("http://t/x")
    await fake_redis.set(cache._meta(url), b"not a hash")  # every script answers WRONGTYPE
    with caplog.at_level(logging.WARNING, logger="app.http_cache"):
        for _ in range(3):
            assert await cache.lookup(url, _variant) is None
        assert await _store(cache, url, "", b"v") is None
    assert cache.stats.errors == 4 and cache.stats.stores == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.http_cache"]
    assert len(warnings) == 1, warnings  # once per change, not per request
    assert "http cache 'httpcache'" in warnings[0] and "refused" in warnings[0]
    assert "WRONGTYPE" not in warnings[0]


async def test_a_refused_invalidation_raises_without_redis_text(fake_redis: Any) -> None:
    cache = HttpResponseCache(fake_redis)
    await fake_redis.set(cache._meta(url_digest_for("http://t/x")), b"not a hash")
    with pytest.raises(RedisCommandError) as info:
        await cache.invalidate("http://t/x")
    assert str(info.value) == "http cache 'httpcache': Redis refused the command"
    assert "WRONGTYPE" in str(info.value.__cause__)
    assert await cache.invalidate("http://t/other") is False  # the server is fine


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"invalidation_window": -1}, "invalidation_window"),
    ],
)
async def test_bad_durations_are_refused_when_the_store_is_built(
    fake_redis: Any, options: dict[str, Any], what: str
) -> None:
    with pytest.raises(ConfigurationError, match=what):
        HttpResponseCache(fake_redis, **options)


async def test_durations_may_be_timedeltas(fake_redis: Any) -> None:
    cache = HttpResponseCache(
        fake_redis, timeout=dt.timedelta(seconds=2), invalidation_window=dt.timedelta(seconds=30)
    )
    assert cache.timeout == 2.0
    assert await cache.invalidate("http://t/x") is False
    assert 29_000 < await fake_redis.pttl(cache._meta(url_digest_for("http://t/x"))) <= 30_000


_PATH_BYTES = st.lists(
    st.sampled_from(
        [
            b"/",
            b"a",
            b"~",
            b"%",
            b"%41",
            b"%7e",
            b"%2F",
            b"%2f",
            b"%25",
            b"%zz",
            b".",
            b"%2E",
            b"\xc3\xa9",
        ]
    ),
    max_size=12,
).map(b"".join)


@settings(max_examples=1000)
@given(_PATH_BYTES, _PATH_BYTES)
def test_one_normalised_path_means_one_path_for_the_app(a: bytes, b: bytes) -> None:
    na, nb = normalize_path(b"/" + a), normalize_path(b"/" + b)
    if na is not None:
        assert normalize_path(na) == na  # stable
    if na is not None and na == nb:  # one cache key: the app (which decodes) sees one path
        assert unquote_to_bytes(b"/" + a) == unquote_to_bytes(b"/" + b)
