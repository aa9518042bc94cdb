"""Let the handler see a form field sent twice, which TorchServe's worker otherwise hides.

TorchServe's frontend passes every form field, multipart part and query parameter as a parameter of the
request, repeated names included, and its worker folds them into one dict keeping the last of each name
(``ts.service.Service.retrieve_data_for_inference``): two images, or two ``prompt`` parts, would silently become
the last one. ``record_repeated_fields`` wraps that step to write the repeated names into the request's
headers under ``REPEATED_HEADER``, a name no HTTP header can carry (it holds spaces), where the HTTP edge
(``handler/protocols/http.py``) refuses them. It is TorchServe 0.12's worker API, pinned in constraints.txt.
"""

import json

from ts.service import Service

from handler.protocols.http import REPEATED_HEADER


def record_repeated_fields() -> None:
    """Wrap the worker's parameter folding, once per worker process."""
    fold = Service.retrieve_data_for_inference
    if getattr(fold, "records_repeated_fields", False):
        return

    def fold_and_record(batch):
        headers, input_batch, request_ids = fold(batch)
        for processor, request in zip(headers, batch):
            names = [parameter["name"] for parameter in request["parameters"]]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                processor.get_request_properties()[REPEATED_HEADER] = json.dumps(repeated)
        return headers, input_batch, request_ids

    fold_and_record.records_repeated_fields = True
    Service.retrieve_data_for_inference = staticmethod(fold_and_record)
