"""What a server of several models says of itself in ``/openapi.json``: the router's own routes (the model
list, loads and unloads, pulls and deletes, Ollama's lists and names) and every route of a model's app, each
routed by the body's ``model`` or ``?model=`` (an enum of the names served at that moment)."""

from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

from . import answers as A
from .app import DESCRIBED
from .openapi import Doc
from .protocol import ModelRequest


def router_routes(own: Collection[tuple[str, str]], names: tuple[str, ...]) -> list[tuple[Sequence[str], str, Doc]]:
    """The router's table for :func:`.openapi.document`: ``own`` are the (method, path) it answers itself,
    ``names`` every name a request may give a model."""
    app_docs = {(path, method): doc for paths, method, doc in DESCRIBED for path in paths}
    table: list[tuple[Sequence[str], str, Doc]] = [
        (("/v1/models", "/models"), "GET", Doc("Every model and its status", answer=A.RoutedModelList)),
        (("/v1/models/{model}",), "GET", Doc("One model and its status (by any of its names)",
                                              answer=A.RoutedModelCard, errors=(404,))),
        (("/health", "/v1/health"), "GET", Doc("The server is up (each model's state: /models)",
                                                answer=A.Health)),
        (("/models/load",), "POST", Doc("Load a model now (the least recently used idle model is unloaded "
                                        "to make room)", request=ModelRequest, answer=A.RoutedModelDone,
                                        errors=(404, 500, 507))),
        (("/models/unload",), "POST", Doc("Unload a model once it answers nothing (its requests are "
                                          "cancelled after its stop timeout)", request=ModelRequest,
                                          answer=A.Success, errors=(404,))),
        (("/models",), "POST", Doc("Pull a model into the store and serve it (answered once the file is "
                                   "verified)", request=ModelRequest, answer=A.RoutedModelDone,
                                   errors=(404, 500, 502, 507))),
        (("/models",), "DELETE", Doc("Stop serving a model of the store and remove it from the store "
                                     "(or ?model=)", request=ModelRequest, answer=A.Success,
                                     errors=(400, 404, 409, 500, 502))),
    ]
    for method, path in (("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/api/version"),
                         ("POST", "/api/copy"), ("POST", "/api/create"), ("POST", "/api/push"),
                         ("POST", "/api/pull"), ("DELETE", "/api/delete")):
        doc = app_docs[(path, method)]
        table.append(((path,), method, dataclasses.replace(doc, errors=(*doc.errors, 409)) if method == "DELETE"
                      else doc))
    for paths, method, doc in DESCRIBED:
        routed = tuple(path for path in paths if (method, path) not in own
                       and not path.startswith("/v1/models/"))
        if routed:  # no model named: 400; an unknown one: 404; one that fails to load or cannot fit: 500, 507
            errors = tuple(sorted({*doc.errors, 400, 404, 500, 507}))
            if (method, routed) == ("GET", ("/props",)):  # without ?model=: the router's own
                doc = dataclasses.replace(doc, summary="The router's properties, or with ?model= the model's",
                                          answer=A.RouterProps)
            table.append((routed, method, dataclasses.replace(doc, routed_to=names, errors=errors)))
    return table
