"""The APIs a client can speak to the served model, as sibling modules on one HTTP edge.

- ``http.py``: the edge every protocol stands on: ``HttpRequest`` (the row and headers, the body read once),
  ``Call`` and ``Reply``, the status of each failure kind, the shared refusals (explanations, content types,
  duplicate JSON keys). Defined once; every protocol imports it, and nothing else of its siblings.
- ``native.py`` (``/predictions/{model}``), ``openai.py`` (``.../v1/images/...``), ``kserve.py`` (KServe v1/v2).
- ``routing.py``: which protocol answers a request, in one table.

Every protocol has one shape (``http.Protocol``), which the handler drives without knowing which it is:

    call = protocol.read_call(HttpRequest(row, headers))   # read(): the body -> a Call, or its Rejection
    requests = call.requests()                              # list[GenerationRequest]: the engine runs these
    reply = protocol.respond(call, outcomes)                # one GenerationResult or Rejection per request

A protocol that streams says so in ``call.streams`` and gives each progress line in ``call.progress``.

Adding a protocol (e.g. AUTOMATIC1111's ``/predictions/{model}/{version}/sdapi/v1/txt2img``):

1. one new module here, ``a1111.py``: a ``Call`` subclass constructible from ``failure`` alone, and a
   ``Protocol`` subclass made as ``A1111Protocol(contract, model)`` with ``read`` and ``respond``, whose error
   body is its own and whose statuses come from ``http.status_of``; it imports ``http`` and the core only;
2. one line in ``routing.ROUTES``: ``(a1111.A1111Protocol, under_route("sdapi")),``.

Nothing else changes: the handler, the metrics and the engine serve it as they serve the others, and its
requests share pipeline calls with every other protocol's.
"""
