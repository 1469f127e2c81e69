"""The live view: ``/live`` (a page) and ``/live/stream`` (Server-Sent Events for one
viewer: ``hello``, ``stats`` every second, the project's ``events`` as they arrive, fed by
the live hub)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import trio

from evactors.core.segment import RequestError
from evactors.pipeline.live_hub import Full, LiveHub
from evactors.service.credentials import WriteKeys
from evactors.service.http.request import Receive, Reply, Scope, Send, encode


class LiveRoutes:
    """Opened by a project's read key (``read_keys``), never by a write key: browser write
    keys are public."""

    def __init__(self, read_keys: WriteKeys, hub: LiveHub) -> None:
        self.read_keys = read_keys
        self.hub = hub

    def page(self, scope: Scope) -> Reply:
        query = dict(parse_qsl(scope.get("query_string", b"").decode(errors="replace")))
        if self.read_keys.project(query.get("key")) is None:
            raise RequestError(401, "unauthorized", "a read key of the project is required (?key=…)")
        return 200, [(b"content-type", b"text/html; charset=utf-8")], PAGE.encode()

    async def stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One viewer's stream, until it goes away, its key is revoked or the service stops."""
        query = dict(parse_qsl(scope.get("query_string", b"").decode(errors="replace")))
        project = self.read_keys.project(query.get("key"))
        if project is None:
            body = encode({"success": False, "error": "unauthorized",
                           "message": "a read key of the project is required (?key=…)"})
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        try:
            viewer = self.hub.join(project)
        except Full as e:
            raise RequestError(503, "too_many_viewers", str(e)) from None
        key = query.get("key")
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})

            async def event(name: str, data: Any) -> None:
                chunk = f"event: {name}\ndata: ".encode() + encode(data) + b"\n\n"
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

            async def stats(cancel: trio.CancelScope) -> None:
                while self.read_keys.project(key) == project:  # a revoked key ends the stream
                    await event("stats", {"live_visitors": self.hub.visitors.get(project, 0),
                                          "events_per_second": self.hub.rate(project)})
                    await trio.sleep(1)
                cancel.cancel()

            async def until_disconnect(cancel: trio.CancelScope) -> None:
                while True:  # the client sends nothing more until it goes away
                    if (await receive())["type"] == "http.disconnect":
                        break
                cancel.cancel()

            await event("hello", {"project": project})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stats, nursery.cancel_scope)
                nursery.start_soon(until_disconnect, nursery.cancel_scope)
                async for rows in viewer.receive:
                    await event("events", rows)
                nursery.cancel_scope.cancel()  # the hub closed: the service is stopping
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except* OSError:
            pass  # the viewer went away: EventSource reconnects by itself
        finally:
            self.hub.leave(viewer)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>evactors live</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px system-ui,sans-serif;margin:2rem;color:#1d2330;background:#f6f7fb}
 h1{font-size:1.2rem;margin:0 0 1rem} .muted{color:#6b7385}
 .cards{display:flex;gap:1rem;margin-bottom:1.5rem}
 .card{background:#fff;border-radius:10px;padding:1rem 1.5rem;box-shadow:0 1px 3px #0002;min-width:11rem}
 .card b{display:block;font-size:2.4rem;font-variant-numeric:tabular-nums}
 table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 3px #0002}
 th,td{text-align:left;padding:.35rem .7rem;border-bottom:1px solid #eceef3;white-space:nowrap}
 th{background:#eef0f6;font-weight:600} #state.bad{color:#b3261e}
</style></head><body>
<h1>evactors live — <span id="project">…</span> <span id="state" class="muted">connecting</span></h1>
<div class="cards">
 <div class="card"><span class="muted">live visitors (5 min)</span><b id="visitors">0</b></div>
 <div class="card"><span class="muted">events / second</span><b id="rate">0</b></div>
 <div class="card"><span class="muted">events seen here</span><b id="total">0</b></div>
</div>
<table><thead><tr><th>time</th><th>event</th><th>path</th><th>where</th><th>browser</th><th>device</th></tr></thead>
<tbody id="events"></tbody></table>
<script>
const key = new URLSearchParams(location.search).get("key") || "";
const stream = new EventSource("/live/stream?key=" + encodeURIComponent(key));
const $ = (id) => document.getElementById(id);
let total = 0;
stream.addEventListener("hello", (e) => { $("project").textContent = JSON.parse(e.data).project;
  $("state").textContent = "live"; $("state").className = "muted"; });
stream.addEventListener("stats", (e) => { const s = JSON.parse(e.data);
  $("visitors").textContent = s.live_visitors; $("rate").textContent = s.events_per_second; });
stream.addEventListener("events", (e) => {
  const rows = JSON.parse(e.data); total += rows.length; $("total").textContent = total;
  for (const r of rows) {
    const tr = document.createElement("tr");
    const cells = [new Date(r.created_at).toLocaleTimeString(), r.name, r.path,
                   [r.city, r.country].filter(Boolean).join(", "), r.browser, r.device];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c ?? ""; tr.appendChild(td); }
    $("events").prepend(tr);
  }
  while ($("events").children.length > 30) $("events").lastChild.remove();
});
stream.onerror = () => { $("state").textContent = "reconnecting"; $("state").className = "bad"; };
</script></body></html>
"""
