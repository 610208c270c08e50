"""An async view that starts a run and awaits its result (tests/test_async.py)."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from .async_steps import async_steps


async def start_and_wait(request: HttpRequest) -> JsonResponse:
    run = await async_steps.astart()
    output = await run.aresult(timeout=float(request.GET.get("timeout", 30)))
    return JsonResponse({"run": str(run.pk), "output": output})
