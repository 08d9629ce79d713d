"""The base of the async API views (adrf), without a needless trip back to the event loop."""

from __future__ import annotations

import asyncio

from adrf.views import APIView as AdrfAPIView
from rest_framework.request import Request
from rest_framework.views import APIView as DrfAPIView


class APIView(AdrfAPIView):
    """adrf's APIView. Its throttle check (adrf 0.1.12 to 0.1.14) runs `async_to_sync` over the
    async throttles even when there are none, from the worker thread of `initial()`: a round
    trip to the event loop and back on every request. The throttles here are synchronous
    (`gateway.throttling`), so DRF's own check runs them, in the same thread, as adrf's would."""

    def check_throttles(self, request: Request) -> None:
        if any(asyncio.iscoroutinefunction(t.allow_request) for t in self.get_throttles()):
            super().check_throttles(request)
        else:
            DrfAPIView.check_throttles(self, request)
