"""Which protocol answers a request: decided here, and only here, by the rules in ``ROUTES``.

TorchServe gives the handler no method and no path, only headers: ``url_path`` holds what follows
``/predictions/{model}/{version}/`` (empty on the native route, absent on KServe's routes), and KServe's
requests are known by their bodies. The first rule that matches wins; a request no rule takes is native.
"""

from typing import Callable

from handler.core.contract import Contract
from handler.protocols import a1111, kserve, native, openai
from handler.protocols.http import HttpRequest, Protocol, ServedModel


def under_route(prefix: str) -> Callable[[HttpRequest], bool]:
    """A rule: the request's ``url_path`` is ``prefix`` or a path below it."""
    return lambda request: request.is_under(prefix)


# (the protocol, the rule that sends a request to it): one line per protocol, tried in this order.
ROUTES: tuple[tuple[type[Protocol], Callable[[HttpRequest], bool]], ...] = (
    (openai.OpenAIProtocol, under_route(openai.PREFIX)),
    (a1111.A1111Protocol, under_route(a1111.PREFIX)),
    (kserve.KServeProtocol, kserve.is_kserve),
)
FALLBACK: type[Protocol] = native.NativeProtocol


class Router:
    """The protocols of one loaded model, and the choice among them for each request."""

    def __init__(self, contract: Contract, model: ServedModel):
        self.routes = [(rule, protocol(contract, model)) for protocol, rule in ROUTES]
        self.fallback = FALLBACK(contract, model)

    def protocol_for(self, request: HttpRequest) -> Protocol:
        return next((protocol for rule, protocol in self.routes if rule(request)), self.fallback)
