"""The API's event fan-out stays bounded: a subscriber that stops reading is dropped with an
``overflow`` event instead of growing memory; the subscriber count is bounded too."""
from __future__ import annotations

import pytest

from pyholepunch.api.registry import EVENT_QUEUE, Events, check_name
from pyholepunch.errors import ApiError


@pytest.mark.asyncio
async def test_slow_subscriber_is_dropped_with_overflow() -> None:
    events = Events(max_subscribers=2)
    slow, fast = events.subscribe(), events.subscribe()
    with pytest.raises(ApiError) as err:
        events.subscribe()
    assert err.value.status == 429
    for i in range(EVENT_QUEUE + 10):
        events.publish("step", {"i": i})
        while not fast.empty():
            fast.get_nowait()
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert items[-2][0] == "overflow" and items[-1] is None
    assert len(items) == EVENT_QUEUE
    events.publish("step", {"i": -1})          # the fast one still hears
    assert fast.get_nowait()[0] == "step"
    events.unsubscribe(fast)
    events.subscribe()                          # room again


def test_connection_names() -> None:
    assert check_name("c-1.x_y") == "c-1.x_y"
    for bad in ("", "a b", "x" * 65, "../etc", "é"):
        with pytest.raises(ApiError):
            check_name(bad)
