"""Parses an OpenMetrics exposition (stdin) with the Prometheus project's own parser
and prints its families as JSON. Any format error raises and exits non-zero."""

import json
import math
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def number(v):
    return None if math.isnan(v) else v


families = [
    {
        "name": f.name,
        "type": f.type,
        "help": f.documentation,
        "samples": [
            {"name": s.name, "labels": s.labels, "value": number(s.value)}
            for s in f.samples
        ],
    }
    for f in text_string_to_metric_families(sys.stdin.read())
]
json.dump(families, sys.stdout)
