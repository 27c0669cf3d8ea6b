#!/usr/bin/env python3
"""Parses what the hub's sinks sent with the CloudEvents Python SDK (pip
`cloudevents`), an implementation independent of the hub's, for end-to-end
tests.

    cloudevents_parse.py < messages.json

messages.json is a list of messages as a far end received them:

    [{"headers": {"content-type": "...", "ce-id": "...", ...},
      "body": "..."}, ...]

(bodies are text: every mode the hub sends is UTF-8 JSON).

An HTTP message (one with headers) goes through the SDK's HTTP binding,
which tells binary mode (ce- headers) from structured mode; one whose
content type is application/cloudevents-batch+json is a JSON array whose
elements each go through the SDK's JSON event format, as do messages without
headers (an MQTT or NATS payload in structured mode).

Prints one JSON object per event, in order: its id, source, type,
specversion, subject, datacontenttype, data, and time as whole microseconds
since the Unix epoch. Anything the SDK refuses ends the script with status 1
and its message on stderr; status 3 if the SDK cannot be imported.
"""

import json
import sys
from datetime import datetime, timedelta, timezone

try:
    from cloudevents.core.bindings.http import HTTPMessage, from_http_event
    from cloudevents.core.formats.json import JSONFormat
except ImportError as e:  # pragma: no cover
    print(f"cannot import the CloudEvents SDK (pip install cloudevents): {e}", file=sys.stderr)
    sys.exit(3)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def describe(event):
    t = event.get_time()
    return {
        "id": event.get_id(),
        "source": event.get_source(),
        "type": event.get_type(),
        "specversion": event.get_specversion(),
        "subject": event.get_subject(),
        "datacontenttype": event.get_datacontenttype(),
        "data": event.get_data(),
        "time_us": None if t is None else (t - EPOCH) // timedelta(microseconds=1),
    }


def main():
    messages = json.load(sys.stdin)
    out = []
    for m in messages:
        body = m["body"].encode()
        headers = m.get("headers")
        if headers is None:
            out.append(JSONFormat().read(None, body))
        elif headers.get("content-type", "").startswith("application/cloudevents-batch+json"):
            for element in json.loads(body):
                out.append(JSONFormat().read(None, json.dumps(element).encode()))
        else:
            out.append(from_http_event(HTTPMessage(headers=headers, body=body)))
    for event in out:
        print(json.dumps(describe(event)))


if __name__ == "__main__":
    main()
