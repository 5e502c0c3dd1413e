"""``pipeline ui``: a web dashboard of running pipelines, served by the framework itself.

- the **topology**: stages and topics drawn as a graph (:mod:`.topology`), each stage coloured
  by health, with its instances, rates and lag updated live from the same sampler as
  ``pipeline status`` (server-sent events);
- **dead letters** per stage: counts by error class over time (:mod:`.counts`), a paged,
  filtered table of decoded dead letters that never loads a topic into memory, and replays
  (one record or a filtered set, counted first; :mod:`.pages`, :mod:`.replays`) through the
  code of ``pipeline dlq replay``;
- **jobs** looked up by id in the status table of a pipeline built with ``.with_jobs()``.

:mod:`.server` is the aiohttp application; pages are Jinja templates, scripts and styles are
served from the package (the graph layout is dagre, vendored from the npm registry).

Example:
    >>> async with Dashboard(bootstrap, [pipeline]) as ui:    # doctest: +SKIP
    ...     print(ui.url)          # http://127.0.0.1:8642/?token=...
"""

from pipeline.ui.server import Dashboard, UiOptions, serve
from pipeline.ui.topology import graph

__all__ = ["Dashboard", "UiOptions", "graph", "serve"]
